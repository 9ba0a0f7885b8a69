"""Scaling-law fit L(C) = a * C^(-b) + c of final loss against training compute.

The irreducible loss c makes the fit non-linear. For each c on a fine grid below the lowest
loss, log(L - c) is linear in log C, so a and b come from least squares; the c with the
smallest squared error in L wins, and Gauss-Newton polishes all three. This needs nothing
beyond numpy and never diverges: the grid search starts it inside the basin.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    a: float
    b: float
    c: float
    rmse: float  # of the fit, in loss units

    def __call__(self, compute: np.ndarray) -> np.ndarray:
        return self.a * np.asarray(compute, float) ** (-self.b) + self.c

    def describe(self) -> str:
        return f"L(C) = {self.a:.4g} · C^(-{self.b:.4f}) + {self.c:.4f}  (rmse {self.rmse:.4f})"


def fit_power_law(compute: np.ndarray, loss: np.ndarray, grid: int = 400) -> PowerLaw:
    """Fits L = a C^-b + c (a, b > 0, 0 <= c < min L) to points (compute, loss)."""
    compute, loss = np.asarray(compute, float), np.asarray(loss, float)
    if compute.shape != loss.shape or compute.ndim != 1:
        raise ValueError("fit: compute and loss must be 1-D arrays of the same length")
    if len(np.unique(compute)) < 3:
        raise ValueError(
            f"fit: a power law with an offset needs at least 3 distinct compute values, got "
            f"{len(np.unique(compute))}; add sizes to the ladder."
        )
    if np.any(compute <= 0) or not np.all(np.isfinite(loss)):
        raise ValueError("fit: compute must be > 0 and every loss finite")
    scale = compute.min()  # fit in units of the smallest compute: well-conditioned
    log_x = np.log(compute / scale)

    def linear_fit(c: float) -> tuple[float, float, float]:
        design = np.stack([np.ones_like(log_x), -log_x], axis=1)
        (log_a, b), *_ = np.linalg.lstsq(design, np.log(loss - c), rcond=None)
        pred = np.exp(log_a) * np.exp(-b * log_x) + c
        return float(np.exp(log_a)), float(b), float(np.sum((pred - loss) ** 2))

    candidates = np.linspace(0.0, loss.min(), grid, endpoint=False)
    best_c = min(candidates, key=lambda c: linear_fit(c)[2])
    a, b, _ = linear_fit(best_c)
    params = np.array([a, b, best_c])
    for _ in range(50):  # Gauss-Newton on (a, b, c)
        a, b, c = params
        xb = np.exp(-b * log_x)
        residual = a * xb + c - loss
        jac = np.stack([xb, -a * log_x * xb, np.ones_like(xb)], axis=1)
        step, *_ = np.linalg.lstsq(jac, -residual, rcond=None)
        new = params + step
        new_sse = np.sum((new[0] * np.exp(-new[1] * log_x) + new[2] - loss) ** 2)
        ok = new[0] > 0 and new[1] > 0 and 0 <= new[2] < loss.min()
        if not ok or new_sse > np.sum(residual**2):
            break
        params = new
    a, b, c = params
    rmse = float(np.sqrt(np.mean((a * np.exp(-b * log_x) + c - loss) ** 2)))
    return PowerLaw(a=float(a * scale**b), b=float(b), c=float(c), rmse=rmse)
