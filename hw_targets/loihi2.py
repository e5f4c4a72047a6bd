"""Loihi 2 targets. Every number is a ``Target`` default (sourced in hw_targets/base.py)."""
from __future__ import annotations

from hw_targets.base import Target, registered


@registered
def loihi2() -> Target:
    """Real Loihi 2 hardware (export only; no CPU verification run). Loihi 2 synapses carry
    a 6-bit delay (0..63 steps; lava-nc's bit-accurate DelayDense/DelaySparse models use
    precision=6), so a residual layer's inputs can arrive up to 63 steps apart and still be
    aligned. The emulator runs them aligned; the netx file records every synapse's source
    and every layer's depth (``ftbc/``), from which each delay follows."""
    return Target(name="loihi2", max_synaptic_delay=63,
                  description="Intel Loihi 2 (fixed point: 8-bit weights, 24-bit state, "
                              "0..63-step synaptic delays align residual inputs)")


@registered
def loihi2_sim() -> Target:
    """Same numbers as ``loihi2`` except synaptic delays (none: Lava's Conv and lava-dl netx
    have no delays, so residual layers are refused); also verified in Lava's CPU simulation
    (fixed_pt)."""
    return Target(name="loihi2-sim", simulated=True,
                  description="Loihi 2 fixed point, verified in Lava's CPU simulation (no "
                              "synaptic delays yet: residual layers are refused)")
