"""Thresholds to 1: divide each spiking layer's state by its per-channel threshold.

With v' = v / theta_l[o] for output channel o of layer l, the neuron equation stays the same
with theta' = 1 when, for every synapse from population ``src`` (theta_src = 1 for the
analog input) into channel o::

    W'[o, i...]        = W[o, i...] * theta_src[channel(i)] / theta_l[o]
    bias'[o]           = bias[o] / theta_l[o]
    bias_schedule'[:,o] = bias_schedule[:, o] / theta_l[o]
    v_init'            = v_init            (already a fraction of the threshold)

so a spike now carries 1 (accumulate-only synapses). ``channel(i)`` is the input channel of
weight column i: the conv weight's second axis (offset by the group), or for a dense weight
on a (C, H, W) source the flattened index // (H * W). The readout (no compare) keeps its
units: W' = W * theta_src, threshold and bias unchanged, so its outputs are identical.

Exactness: in real arithmetic the spike trains are identical. In floating point the readout
is exact (s is 0/1, so (W * theta) * s == W * (theta * s)); a spiking layer's compare could
only flip if v lies within a few ulps of theta, which the tests check does not happen on
several seeded models in float64 (spike trains compared with array equality).
"""
from __future__ import annotations

import numpy as np

from core.ir import INPUT, NeuronLayer, SnnGraph, Synapse, SynapseKind, evolve


def normalize(snn: SnnGraph) -> SnnGraph:
    """A new SnnGraph with every spiking threshold 1 (see the module docstring)."""
    thetas = {layer.name: np.asarray(layer.threshold) for layer in snn.layers}
    shapes = {layer.name: tuple(layer.shape) for layer in snn.layers}
    shapes[INPUT] = tuple(snn.input.shape)
    layers = tuple(_normalize_layer(layer, thetas, shapes) for layer in snn.layers)
    return evolve(snn, layers=layers, meta={**snn.meta, "normalized": True})


def _normalize_layer(layer: NeuronLayer, thetas: dict, shapes: dict) -> NeuronLayer:
    out_scale = np.ones(layer.channels) if layer.readout else np.asarray(layer.threshold)
    syns = tuple(_scale_synapse(s, _source_theta(s, thetas, shapes), out_scale, layer)
                 for s in layer.synapses)
    if layer.readout:
        return evolve(layer, synapses=syns)
    sched = layer.bias_schedule
    return evolve(layer, synapses=syns, bias=np.asarray(layer.bias) / out_scale,
                  threshold=np.ones(layer.channels),
                  bias_schedule=None if sched is None else np.asarray(sched) / out_scale)


def _source_theta(syn: Synapse, thetas: dict, shapes: dict) -> np.ndarray:
    """theta of the source's channels (ones for the analog input)."""
    if syn.source == INPUT:
        return np.ones(shapes[INPUT][0])
    return thetas[syn.source]


def _scale_synapse(syn: Synapse, src_theta: np.ndarray, out_scale: np.ndarray,
                   layer: NeuronLayer) -> Synapse:
    """W[o, i] * src_theta[channel(i)] / out_scale[o]."""
    w = np.asarray(syn.weight, dtype=np.float64)
    return evolve(syn, weight=w * _column_theta(syn, w, src_theta, layer)
                  / out_scale.reshape((-1,) + (1,) * (w.ndim - 1)))


def _column_theta(syn: Synapse, w: np.ndarray, src_theta: np.ndarray,
                  layer: NeuronLayer) -> np.ndarray:
    """src theta broadcast to the weight's shape, by the input channel of each column."""
    if syn.kind is SynapseKind.DENSE:
        per_channel = w.shape[1] // src_theta.shape[0]
        return np.repeat(src_theta, per_channel)[None, :]
    out_c, in_per_group = w.shape[:2]
    group = np.arange(out_c) // (out_c // syn.groups)
    channel = group[:, None] * in_per_group + np.arange(in_per_group)[None, :]
    return src_theta[channel][:, :, None, None]
