"""Held-out accuracy of trained ViT runs on clean and perturbed digits.

    python experiments/augment_robustness/measure.py RUN_OR_SWEEP_DIR... [--json F]

Every run directory found (a directory with config.json and checkpoints/) is restored on
this machine's devices and scored on its own held-out split under fixed perturbations:
one-pixel shifts (the mean over the 4 directions), two-pixel shifts, brightness -0.3,
contrast x0.5 and Gaussian pixel noise (sigma 0.1, seeded). Runs are grouped by
`data.augment` and reported as mean ± std over seeds, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np


def shift(images_BHWC: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Moves the image content by (dy, dx) pixels, filling with zeros (the background)."""
    h, w = images_BHWC.shape[1:3]
    s = max(abs(dy), abs(dx))
    padded = np.pad(images_BHWC, ((0, 0), (s, s), (s, s), (0, 0)))
    return padded[:, s - dy : s - dy + h, s - dx : s - dx + w]


def perturbations(images_BHWC: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Name -> the perturbed copies whose accuracies are averaged."""
    noise = np.random.default_rng(0).normal(0.0, 0.1, images_BHWC.shape)
    mean = images_BHWC.mean(axis=(1, 2, 3), keepdims=True)
    return {
        "clean": [images_BHWC],
        "shift 1 px": [shift(images_BHWC, dy, dx) for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1))],
        "shift 2 px": [shift(images_BHWC, dy, dx) for dy, dx in ((2, 0), (-2, 0), (0, 2), (0, -2))],
        "brightness -0.3": [images_BHWC - 0.3],
        "contrast x0.5": [(images_BHWC - mean) * 0.5 + mean],
        "noise 0.1": [images_BHWC + noise],
    }


def accuracies(workdir: Path) -> dict[str, float]:
    import jax
    from flax import nnx

    from bigjax.data import images
    from bigjax.trained import open_run

    with open_run(str(workdir), [], "measure") as (prog, params, _):
        cfg = prog.cfg
        data = images.load(cfg.data.images, "validation", cfg.data.eval_fraction,
                           cfg.model.image_size, cfg.model.channels)  # fmt: skip
        model = nnx.merge(prog.graphdef, params)
        predict = jax.jit(lambda x: model.classify(x)[0].argmax(-1))
        out = {}
        for name, copies in perturbations(data.images).items():
            scores = [
                float(
                    np.mean(
                        np.asarray(predict(np.clip(c, 0.0, 1.0).astype(np.float32))) == data.labels
                    )
                )  # fmt: skip
                for c in copies
            ]
            out[name] = float(np.mean(scores))
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the per-run numbers here")
    args = parser.parse_args()
    runs = sorted({p.parent for root in args.paths for p in root.rglob("config.json")
                   if (p.parent / "checkpoints").is_dir()})  # fmt: skip
    if not runs:
        raise SystemExit(f"no run directories (config.json + checkpoints/) under {args.paths}")
    groups: dict[str, list[dict[str, float]]] = {}
    per_run = {}
    for run in runs:
        cfg = json.loads((run / "config.json").read_text())
        label = "augment" if cfg["data"]["augment"] else "no augment"
        per_run[str(run)] = accs = accuracies(run)
        groups.setdefault(label, []).append(accs)
        print(f"{run} ({label}, seed {cfg['seed']}): "
              + ", ".join(f"{k} {v:.1%}" for k, v in accs.items()), flush=True)  # fmt: skip
    names = list(next(iter(per_run.values())))
    print("\n| training | runs | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for label, rows in groups.items():
        cells = []
        for n in names:
            vals = [100 * r[n] for r in rows]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {std:.1f}")
        print(f"| {label} | {len(rows)} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(per_run, indent=1))


if __name__ == "__main__":
    main()
