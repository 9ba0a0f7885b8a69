"""The ViT: patches, Grain augmentations, training on scikit-learn's digits and on a
directory of image files, sharded equal to one device."""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from bigjax import models
from bigjax.config import ConfigError, from_configdict
from bigjax.data import images
from bigjax.models.vit import param_count, patchify
from bigjax.train import train

VIT = dict(family="vit", d_model=64, num_layers=2, num_heads=4, d_ff=128, image_size=8,
           patch_size=2, channels=1, num_classes=10)  # fmt: skip
DIGITS = dict(task="images", images="digits", batch_size=32, seq_len=17, eval_fraction=0.2)


def test_patchify_takes_row_major_square_patches():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    p = patchify(x, 4)  # 4 patches of 4 x 4 x 3
    assert p.shape == (2, 4, 48)
    np.testing.assert_array_equal(p[1, 1].reshape(4, 4, 3), x[1, 0:4, 4:8])  # top right
    np.testing.assert_array_equal(p[0, 2].reshape(4, 4, 3), x[0, 4:8, 0:4])  # bottom left


def test_param_count_matches_formula():
    cfg = from_configdict({"model": VIT, "data": DIGITS})
    _, state = models.abstract(cfg.model, cfg.mesh.rules)
    assert models.count_params(state) == param_count(cfg.model)


def test_augmentations_are_seeded_shifts_and_contrast():
    data = images.load("digits", "train", 0.2, 8, 1)
    import grain

    def first(seed):
        ds = grain.MapDataset.source(images.Record(data)).random_map(images.Augment(), seed=seed)
        return [ds[i]["image"] for i in range(20)]

    a, b, c = first(0), first(0), first(1)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)  # same seed, same element: same augmentation
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(x.min() >= 0 and x.max() <= 1 and x.shape == (8, 8, 1) for x in a)
    assert any(not np.array_equal(x, data.images[i]) for i, x in enumerate(a))


@pytest.mark.slow
def test_vit_learns_digits_and_reports_metrics(tmp_path):
    cfg = tiny_config(num_steps=150, model=VIT, data=DIGITS, eval={"num_batches": 8},
                      optim={"warmup_steps": 10, "lr": 3e-3})  # fmt: skip
    out = train(cfg, tmp_path / "vit")
    # 10 classes (chance 10 %); 150 steps of 32 augmented digits reach ~80 % held out
    assert out["accuracy"] > 0.6 and {"precision", "recall", "f1"} <= set(out)


@pytest.mark.slow
def test_sharded_vit_training_equals_one_device():
    from helpers import run_steps

    from bigjax.data import dataset, pipeline

    cfg = tiny_config(model=VIT, data={**DIGITS, "augment": False})
    it = pipeline.for_config(
        cfg.data,
        split="train",
        seed=0,
        workers=0,
        image_shape=(8, 1),
        tokenizer=dataset.tokenizer_for(cfg.data),
    )
    batches = [next(it) for _ in range(3)]
    it.close()
    ref, _, _ = run_steps(cfg, batches, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    got, _, _ = run_steps(cfg, batches, mesh_shape=(2, 2, 2))
    for a, b in zip(got, ref, strict=True):  # f32, reduction order only: 1e-5
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert a["accuracy"] == b["accuracy"]


@pytest.mark.slow
def test_vit_on_a_directory_of_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("horizontal", "vertical"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(40):
            img = rng.uniform(0, 60, (16, 16)).astype(np.uint8)
            line = rng.integers(2, 14)
            if label == "horizontal":
                img[line] = 255
            else:
                img[:, line] = 255
            Image.fromarray(img).save(tmp_path / "imgs" / label / f"{i}.png")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image, skipped")
    model = {**VIT, "image_size": 8, "num_classes": 2}  # resized 16 -> 8 on load
    data = {**DIGITS, "images": str(tmp_path / "imgs"), "batch_size": 16, "eval_fraction": 0.25}
    cfg = tiny_config(num_steps=60, model=model, data=data, optim={"warmup_steps": 5})
    out = train(cfg, tmp_path / "run")
    assert out["accuracy"] > 0.9


def test_an_image_folder_as_tools_leave_it(tmp_path):
    # Jupyter's .ipynb_checkpoints/ and a zip's __MACOSX/ were classes; macOS's ._a.png (a
    # resource fork) stopped the load as a broken image; images in a sub-folder were left out
    # without a word; a name that is not UTF-8 raised UnicodeEncodeError; a FIFO named like an
    # image hung the run
    from PIL import Image

    from bigjax.data.sources import DataError

    root = tmp_path / "imgs"

    def png(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), value, np.uint8)).save(path)

    png(root / "cat" / "a.png", 10)
    png(root / "cat" / "deeper" / "b.png", 20)
    png(root / "dog" / "c.png", 30)
    png(Path(os.fsdecode(os.fsencode(root) + b"/dog/caf\xe9.png")), 40)
    (root / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    png(root / ".ipynb_checkpoints" / "x.png", 50)
    png(root / "__MACOSX" / "cat" / "y.png", 60)
    got = images.load(str(root), "train", 0.0, 4, 1)
    assert got.classes == ("cat", "dog")
    values = (got.images[:, 0, 0, 0] * 255).round().astype(int).tolist()
    assert sorted(zip(got.labels.tolist(), values, strict=True)) == [
        (0, 10), (0, 20), (1, 30), (1, 40)
    ]  # fmt: skip
    os.mkfifo(root / "dog" / "pipe.png")
    with pytest.raises(DataError, match="pipe.png: not regular file"):
        images.load(str(root), "train", 0.0, 4, 1)


def test_image_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="set data.seq_len=17"):
        from_configdict({"model": VIT, "data": {**DIGITS, "seq_len": 16}})
    with pytest.raises(ConfigError, match="family=vit trains on data.task=images"):
        from_configdict({"model": VIT, "data": {"task": "lm"}})
    from bigjax.data.sources import DataError

    with pytest.raises(DataError, match="neither 'digits' nor a directory"):
        images.load(str(tmp_path / "missing"), "train", 0.2, 8, 1)
    with pytest.raises(DataError, match="set model.image_size=8"):
        images.load("digits", "train", 0.2, 16, 1)
