"""Sweeps and ablations: specs (`spec`), device splitting (`devices`), the runner (`runner`)
and its study's database (`database`).

Spec files import from here:

    from bigjax.sweep import Grid, LogUniform, Sweep, ablation
"""

from bigjax.sweep.spec import (
    Choice,
    Grid,
    IntUniform,
    LogUniform,
    Sweep,
    Uniform,
    ablation,
    ladder,
)

__all__ = ["Choice", "Grid", "IntUniform", "LogUniform", "Sweep", "Uniform", "ablation", "ladder"]
