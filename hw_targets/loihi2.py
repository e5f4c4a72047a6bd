"""Loihi 2 targets. Every number is a ``Target`` default (sourced in hw_targets/base.py)."""
from __future__ import annotations

from hw_targets.base import Target, registered


@registered
def loihi2() -> Target:
    """Real Loihi 2 hardware (export only; no CPU verification run). Loihi 2 synapses carry
    a 6-bit delay (0..63 steps; lava-nc's bit-accurate DelayDense/DelaySparse models use
    precision=6), so a residual layer's inputs can arrive up to 63 steps apart and still be
    aligned (``hw_targets.timing``); the netx file records every synapse's delay."""
    return Target(name="loihi2",
                  description="Intel Loihi 2 (fixed point: 8-bit weights, 24-bit state, "
                              "0..63-step synaptic delays align residual inputs)")


@registered
def loihi2_sim() -> Target:
    """Same numbers as ``loihi2``, also verified in Lava's CPU simulation (fixed_pt). Delayed
    synapses run as lava-nc's bit-accurate ``DelaySparse`` (a conv as its sparse connection
    matrix); Lava's Conv has no weight exponent, so conv synapses keep weight_exp 0 (the
    quantizer always writes 0)."""
    return Target(name="loihi2-sim", simulated=True, conv_weight_exp=False,
                  description="Loihi 2 fixed point, verified spike for spike in Lava's CPU "
                              "simulation (residual inputs aligned by synaptic delays)")
