"""Time on the chip: layer depths and the synaptic delays that align residual inputs.

The integer reference (``sims/reference.py``), the emulator and the engine have no delays:
a layer's step t sees its sources' step-t outputs. On Loihi 2 (and in Lava) every synaptic
hop delivers one step late (Lava's Dense/Conv/Sparse send at step k what arrived at k-1), so

* a layer's **depth** is its number of hops from the input along the longest path,
  ``depth(layer) = 1 + max over its sources of depth(source)`` (the input has depth 0), and
  its step t runs at chip step ``depth + t``;
* a synapse from a shallower source must hold its spikes back: its **synaptic delay** (the
  extra steps beyond the one every hop takes, Loihi 2's per-synapse delay field, lava-nc's
  ``DelaySparse`` ``delays``) is ``depth(layer) - 1 - depth(source)``. It is 0 on the longest
  path and on every plain chain; the shortcut of a ResNet basic block (its sum is two layers
  below the block's input, the shortcut one hop) gets 1, a shortcut around k layers k - 1.

This is the one place that computes depths and delays: the quantizer stores ``QLayer.depth``
from it, ``exporters.quantize.validate`` checks a graph's depths and delays against it and
against ``Target.max_synaptic_delay``, the netx file records both, the netlist counts the
delay slots and the Lava runner builds its delayed synapses from it.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Protocol

from core.ir import INPUT


class _Source(Protocol):
    source: str


class _Layer(Protocol):
    name: str
    synapses: tuple


def layer_depths(layers: Iterable[_Layer]) -> dict[str, int]:
    """Synaptic hops from the input along the longest path: 1 + max over sources (the input
    has depth 0). ``layers`` in topological order (every IR graph is)."""
    depth: dict[str, int] = {INPUT: 0}
    for layer in layers:
        depth[layer.name] = 1 + max(depth[s.source] for s in layer.synapses)
    return depth


def synapse_delay(layer: _Layer, syn: _Source, depths: Mapping[str, int]) -> int:
    """Extra steps ``syn`` must hold its spikes so they reach ``layer`` with those of its
    longest input path: ``depth(layer) - 1 - depth(source)``."""
    return depths[layer.name] - 1 - depths[syn.source]


def synaptic_delays(layers: Iterable[_Layer]) -> dict[str, tuple[int, ...]]:
    """Per layer, the delay of each of its synapses (in synapse order)."""
    layers = tuple(layers)
    depths = layer_depths(layers)
    return {layer.name: tuple(synapse_delay(layer, s, depths) for s in layer.synapses)
            for layer in layers}
