"""Loihi 2 chip resources and per-operation energies: the numbers ``exporters.netlist`` uses
to place a ``QuantGraph`` on neurocores and to estimate its energy.

Every field says where its number comes from. Three kinds of source:

* PUBLIC: Intel's Loihi 2 technology brief ("Taking Neuromorphic Computing to the Next
  Level with Loihi 2", Intel Labs, 2021): 128 neuromorphic cores per chip, up to 1 million
  neurons and 120 million synapses per chip.
* DERIVED: arithmetic on public figures (e.g. 2**20 neurons / 128 cores = 8192 per core).
* ASSUMPTION: Intel has not published the figure for Loihi 2. We take the Loihi 1 value
  (Davies et al., "Loihi: a neuromorphic manycore processor with on-chip learning",
  IEEE Micro 38(1), 2018) or a conservative choice, and say so. Treat every result that
  depends on an assumption as an estimate; change the parameter, not the code, when better
  figures are known.

Nothing here is checked against hardware: the netlist is a planning estimate, and the
compiler of Intel's NxSDK/Lava-Loihi decides the real placement.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

PUBLIC, DERIVED, ASSUMPTION = "public", "derived", "assumption"


@dataclass(frozen=True)
class CoreLimits:
    """What one neurocore and one chip can hold."""
    # PUBLIC: 128 neuromorphic cores per Loihi 2 chip (technology brief, 2021).
    cores_per_chip: int = 128
    # DERIVED: "up to 1M neurons per chip" (brief) / 128 cores = 8192 neurons per core
    # (2**20 / 2**7); the brief's maximum assumes the smallest neuron state, so a neuron
    # program with a time-indexed bias may fit fewer (see bias_memory_bits_per_core).
    neurons_per_core: int = 8192
    # ASSUMPTION: synaptic memory per core. Loihi 1 had 128 KB of synaptic memory per core
    # (Davies et al. 2018); Loihi 2's core memory is flexibly partitioned and its split is not
    # public. 128 KiB = 1,048,576 bits. (Cross-check: 120M synapses / 128 cores = 937,500
    # synapses per core, i.e. ~1.1 bit per synapse at the densest encoding; at 8 bits per
    # weight 128 KiB holds 131,072 synapses.)
    synapse_memory_bits_per_core: int = 128 * 1024 * 8
    # ASSUMPTION: bits per stored synapse beyond the weight itself (index/format overhead).
    # 0: dense and convolutional connectivity use dense-format synapse lists.
    synapse_overhead_bits: int = 0
    # ASSUMPTION: conv weights stored once per core per output channel (Loihi 2 advertises
    # convolutional connectivity compression, but its per-core layout is not public).
    # False (conservative): every connection is stored as its own synapse.
    conv_weight_sharing: bool = False
    # ASSUMPTION: distinct input axons (source neurons) one core can receive. Loihi 1: 4096
    # fan-in axons per core (Davies et al. 2018); Loihi 2 not public.
    fan_in_axons_per_core: int = 4096
    # ASSUMPTION: memory for the time-indexed bias schedule (T x channels mantissas of the
    # layer's neurons on that core), held by the microcoded neuron program. Not public;
    # 64 KiB = 524,288 bits, the part of Loihi 2's flexible core memory we reserve for it.
    bias_memory_bits_per_core: int = 64 * 1024 * 8
    # ASSUMPTION: dendritic accumulator slots per core. A neuron whose incoming synapses
    # carry synaptic delays up to d (hw_targets/timing.py) needs d + 1 accumulator slots, a
    # ring buffer with one slot per step still to come (as Loihi 1's dendritic accumulator,
    # Davies et al. 2018; lava-nc's DelaySparse keeps the same (neurons, d + 1) buffer).
    # Loihi 2's figure is not public: we assume 2 slots for each of the 8192 neurons a core
    # can hold, so a full core aligns one extra step and longer delays fit fewer neurons.
    delay_slots_per_core: int = 2 * 8192
    # ASSUMPTION: neuron state memory per core. The brief's 8192 neurons per core assume the
    # smallest neuron state; we read that as one 24-bit state word per neuron (an IF neuron's
    # membrane v), 8192 x 24 = 196,608 bits. A neuron with more state fits fewer per core:
    # the signed neuron (sims/reference.py) keeps its net spike count beside v, a second
    # 24-bit word as in our Lava model (sims/lava_procs), so a full core holds 4096 of them.
    # Loihi 2's state memory is flexibly partitioned and its size is not public.
    neuron_state_bits_per_core: int = 8192 * 24


@dataclass(frozen=True)
class EnergyModel:
    """Energy per operation in picojoules. ESTIMATES: Intel has not published per-operation
    energies for Loihi 2; the Loihi 1 measurements of Davies et al. 2018 (Table 2, 14 nm)
    are used as a proxy (Loihi 2, Intel 4 process, is expected to be no worse)."""
    # ASSUMPTION (Loihi 1, Davies et al. 2018): energy per synaptic spike operation, minimum.
    synop_pj: float = 23.6
    # ASSUMPTION (Loihi 1, Davies et al. 2018): neuron update, inactive 52 pJ / active 81 pJ;
    # every neuron is updated every step, we charge the inactive figure to all of them.
    neuron_update_pj: float = 52.0
    # ASSUMPTION (Loihi 1, Davies et al. 2018): within-tile spike energy, charged per spike
    # (and per graded input event) sent.
    spike_pj: float = 1.7
    # Reference for the ANN, not Loihi (Horowitz, "Computing's energy problem", ISSCC 2014,
    # 45 nm): one 8-bit integer MAC = 0.2 pJ multiply + 0.03 pJ add; one 32-bit float MAC
    # = 3.7 pJ multiply + 0.9 pJ add. Memory access, which dominates real accelerators, is
    # not included on either side.
    ann_mac_int8_pj: float = 0.23
    ann_mac_fp32_pj: float = 4.6


@dataclass(frozen=True)
class ChipResources:
    """Core limits and energy model of one chip family, with the source kind of each field."""
    name: str
    limits: CoreLimits = CoreLimits()
    energy: EnergyModel = EnergyModel()


SOURCES: dict[str, str] = {
    "cores_per_chip": PUBLIC, "neurons_per_core": DERIVED,
    "synapse_memory_bits_per_core": ASSUMPTION, "synapse_overhead_bits": ASSUMPTION,
    "conv_weight_sharing": ASSUMPTION, "fan_in_axons_per_core": ASSUMPTION,
    "bias_memory_bits_per_core": ASSUMPTION, "delay_slots_per_core": ASSUMPTION,
    "neuron_state_bits_per_core": ASSUMPTION,
    "synop_pj": ASSUMPTION,
    "neuron_update_pj": ASSUMPTION, "spike_pj": ASSUMPTION,
    "ann_mac_int8_pj": PUBLIC, "ann_mac_fp32_pj": PUBLIC,
}

LOIHI2 = ChipResources(name="loihi2")

# Targets that deploy to Loihi 2 silicon (the netlist applies to them).
RESOURCES: dict[str, ChipResources] = {"loihi2": LOIHI2, "loihi2-sim": LOIHI2}


def resources_for(target_name: str) -> ChipResources | None:
    """The chip resources of a target, or None for targets that are not a chip (float, nir)."""
    return RESOURCES.get(target_name)


def describe(resources: ChipResources) -> dict[str, Any]:
    """JSON-able record: every parameter with its value and its source kind."""
    out: dict[str, Any] = {"name": resources.name}
    for part in (resources.limits, resources.energy):
        for f in fields(part):
            out[f.name] = {"value": getattr(part, f.name), "source": SOURCES[f.name]}
    return out
