"""Test-only reference of the MSE threshold search: the per-channel grid search written the
straightforward way, one pass per candidate fraction (tests/test_convert.py checks
toolchain.convert.threshold_mse against it; bench/bench_threshold.py times both)."""
from __future__ import annotations

import torch

from toolchain.convert import MSE_FRACTIONS


def grid_search_mse(values: torch.Tensor, timesteps: int, offset: float) -> torch.Tensor:
    """The reference: theta = f * max per channel, for every f in the grid quantize all values
    with q_T(a; theta) = clamp(floor(a T / theta + offset), 0, T) theta / T and keep the f of
    the smallest sum of squared errors (first on ties). Vectorised over channels and values,
    one pass per candidate: the direct writing of the definition."""
    vmax = values.max(1).values.clamp(min=1e-30)
    best_err = torch.full_like(vmax, float("inf"))
    best = vmax.clone()
    for f in MSE_FRACTIONS:
        theta = (vmax * f)[:, None]
        q = torch.clamp(torch.floor(values * timesteps / theta + offset), 0, timesteps)
        err = ((values - q * theta / timesteps) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, theta[:, 0], best)
    return best
