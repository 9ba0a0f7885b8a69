"""Labelled images for the ViT (`data.task=images`), with Grain augmentations.

Sources (`data.images`):
  digits: scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), shipped inside the
          package: no download.
  DIR:    a directory with one sub-directory per class holding image files (PNG, JPEG, BMP,
          GIF) at any depth, read with Pillow, converted to the model's channels and resized
          to model.image_size. Names starting with '.' are not classes nor images (Jupyter's
          .ipynb_checkpoints/, macOS's ._photo.png), nor is a zip's __MACOSX/ folder; other
          files are skipped; an image that does not decode, or a FIFO named like one, is an
          error naming it.

An image goes to the validation split by a hash of its name (index for digits, relative path
for a directory), so the split does not depend on listing order. Training images are
augmented by `Augment`, a Grain RandomMap: each element's random stream is derived from the
dataset seed and its position, so augmentations are reproducible and resume exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import grain
import numpy as np

from bigjax.data import files as filetree
from bigjax.data.sources import DataError
from bigjax.errors import shown_path

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


def _not_data(name: str) -> bool:
    """Folders beside the classes that tools make: hidden ones, and a macOS zip's resource
    forks."""
    return name.startswith(".") or name == "__MACOSX"


@dataclasses.dataclass(frozen=True)
class Images:
    images: np.ndarray  # [N, H, W, C] float32 in [0, 1]
    labels: np.ndarray  # [N] int32
    classes: tuple[str, ...]
    digest: str = ""  # of every image of the source (both splits): a resume checks it


def _held_out(name: str, eval_fraction: float) -> bool:
    digest = hashlib.sha256(os.fsencode(name)).digest()  # a name that is not UTF-8 too
    return int.from_bytes(digest[:8], "little") / 2**64 < eval_fraction


def load(source: str, split: str, eval_fraction: float, size: int, channels: int) -> Images:
    """One split of `source`, as arrays [N, size, size, channels]."""
    if source == "digits":
        images, labels, names, classes = _digits(size, channels)
    else:
        images, labels, names, classes = _directory(Path(source), size, channels)
    keep = np.asarray([_held_out(n, eval_fraction) == (split == "validation") for n in names])
    if not keep.any():
        raise DataError(f"data.images={source!r}: the {split} split is empty; add images or "
                        "change data.eval_fraction.")  # fmt: skip
    digest = hashlib.sha256(np.ascontiguousarray(images).data.cast("B"))
    digest.update(repr((labels.tolist(), classes)).encode("utf-8"))
    return Images(images[keep], labels[keep].astype(np.int32), classes, digest.hexdigest()[:16])


def _digits(size: int, channels: int) -> tuple:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("data.images=digits needs scikit-learn: pip install scikit-learn") from None
    if (size, channels) != (8, 1):
        raise DataError(
            f"the digits are 8x8 grayscale; set model.image_size=8 and model.channels=1 "
            f"(got {size} and {channels})."
        )
    d = load_digits()
    images = (d.images[..., None] / 16.0).astype(np.float32)
    return images, d.target, [str(i) for i in range(len(images))], tuple(map(str, range(10)))


def _directory(root: Path, size: int, channels: int) -> tuple:
    from PIL import Image  # matplotlib's dependency; only directories of files need it

    if not root.is_dir():
        raise DataError(f"data.images: {str(root)!r} is neither 'digits' nor a directory.")
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not _not_data(p.name)))
    if len(classes) < 2:
        raise DataError(f"data.images: {root} needs one sub-directory per class (found {classes}).")
    images, labels, names = [], [], []
    mode = {1: "L", 3: "RGB"}[channels]
    for label, name in enumerate(classes):
        for path in filetree.under(root / name):  # hidden names left out, each folder once
            if path.suffix.lower() not in SUFFIXES or path.is_dir():
                continue
            try:
                with filetree.open_regular(path) as raw, Image.open(raw) as file:
                    im = file.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                    array = np.asarray(im, np.float32) / 255.0
            except filetree.Skip as e:
                raise DataError(f"{shown_path(path)}: {e.reason.replace('_', ' ')}.") from None
            # DecompressionBombError: a few KB that decode to gigapixels (Pillow's own limit)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{shown_path(path)}: not a readable image ({e}).") from None
            images.append(array.reshape(size, size, channels))
            labels.append(label)
            names.append(str(path.relative_to(root)))
    if not images:
        raise DataError(f"data.images: no {SUFFIXES} files under {root}/<class>/.")
    return np.stack(images), np.asarray(labels), names, classes


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """A random crop (a shift of up to `max_shift` pixels, zero fill), an optional horizontal
    flip (not for digits: a flipped 2 is no 2), and colour jitter: contrast around the mean
    and brightness of up to `contrast`; values stay in [0, 1]."""

    max_shift: int = 1
    contrast: float = 0.2
    flip: bool = False

    def random_map(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict:
        image = element["image"]
        h, w, _ = image.shape
        s = self.max_shift
        dy, dx = rng.integers(-s, s + 1, size=2)
        padded = np.pad(image, ((s, s), (s, s), (0, 0)))
        shifted = padded[s + dy : s + dy + h, s + dx : s + dx + w]
        if self.flip and rng.random() < 0.5:
            shifted = shifted[:, ::-1]
        scale = 1.0 + rng.uniform(-self.contrast, self.contrast)
        brightness = rng.uniform(-self.contrast, self.contrast) / 2
        mean = shifted.mean()
        out = np.clip((shifted - mean) * scale + mean + brightness, 0.0, 1.0).astype(np.float32)
        return {**element, "image": out}


@dataclasses.dataclass(frozen=True)
class Record:
    """Index -> {"image", "label"} over the arrays (a Grain map source)."""

    data: Images

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.data.images[i], "label": self.data.labels[i]}
