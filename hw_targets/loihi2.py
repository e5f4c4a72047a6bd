"""Loihi 2 targets. Every number is a ``Target`` default (sourced in hw_targets/base.py)."""
from __future__ import annotations

from hw_targets.base import Target, registered


@registered
def loihi2() -> Target:
    """Real Loihi 2 hardware (export only; no CPU verification run)."""
    return Target(name="loihi2",
                  description="Intel Loihi 2 (fixed point: 8-bit weights, 24-bit state)")


@registered
def loihi2_sim() -> Target:
    """Same numbers as ``loihi2``; also verified in Lava's CPU simulation (fixed_pt)."""
    return Target(name="loihi2-sim", simulated=True,
                  description="Loihi 2 fixed point, verified in Lava's CPU simulation")
