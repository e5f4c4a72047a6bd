"""Normalised float ``SnnGraph`` -> NIR graph (``network.nir``), for other neuromorphic
platforms and simulators (NIR: Pedersen et al., "Neuromorphic intermediate representation",
Nature Communications 15, 8122 (2024); package ``nir`` 1.0.x).

Mapping (node names in brackets)
--------------------------------
* the input [``input``]: ``nir.Input`` with the input shape;
* every synapse [``<layer>.syn<k>``]: ``nir.Conv2d`` (with ``input_shape``; a grouped conv is
  written as the equivalent ungrouped one, its kernel zero outside the groups, because NIR
  1.0's type inference takes ``weight.shape[1]`` as the input channel count) or
  ``nir.Affine``. The layer's constant bias is the bias of its first synapse, zeros on the
  others; a dense synapse on a (C, H, W) source reads it through a ``nir.Flatten``
  [``<source>.flatten``], C order;
* every spiking layer [``<layer>``]: ``nir.IF`` with r = 1, v_threshold = the channel's
  threshold at every neuron, v_reset = 0; several synapses into one layer are several edges
  into it (NIR sums them);
* the readout [``<layer>``]: ``nir.I`` (an integrator, r = 1), then [``output``]: ``nir.Output``.
Average pools are already folded into the next layer's weights (exact), so there are no
pooling nodes.

What NIR 1.0 cannot hold, carried in ``metadata`` (``nir.write``/``nir.read`` round-trip it)
-------------------------------------------------------------------------------------------
NIR's IF fires on ``v > v_threshold`` and resets to ``v_reset``, in continuous time. Ours,
in discrete steps t = 1..T (``core/ir.py``)::

    v[t] = v[t-1] + I[t] + bias[c] + bias_schedule[t-1, c];  s = v >= theta;  v -= theta * s

so each IF node's metadata holds ``bias_schedule`` (T, C) (FTBC's time-indexed bias, added
on top of the synapse bias), ``v_init`` (C,) (v[0] = v_init * theta), ``reset`` =
"subtract", ``compare`` = ">=" (a signed layer, ``--neuron signed``: ``ftbc_neuron`` =
"signed_subtract" and ``negative_spike`` its -1 rule, which NIR's IF cannot send). The
readout's metadata says its output after step t is v[t] (the prediction is the argmax after
T steps), with its own schedule and v_init. The input
node's metadata holds the per-channel transform (x - mean) / std and "constant" encoding (the
same analog sample at every step). Graph metadata: format, version, T, the neuron equation
and the SnnGraph's provenance as JSON. A reader that ignores metadata gets a network
without the FTBC correction, with reset-to-zero neurons: not the calibrated network.

No torch here. ``write_nir`` is atomic (temporary file + ``os.replace``).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import InputError
from core.ir import INPUT, NeuronLayer, SnnGraph, Synapse, SynapseKind

FORMAT = "ftbc-nir"
VERSION = 1
NEURON_EQUATION = ("discrete time t = 1..T: v[t] = v[t-1] + I[t] + bias_schedule[t-1, c] "
                   "(I includes the synapse biases); spiking layers: s[t] = v[t] >= "
                   "v_threshold, v[t] -= v_threshold * s[t]; v[0] = v_init * v_threshold; "
                   "readout: output v[t], no spikes; input: the same sample every step")


def _nir():
    """Import ``nir`` with an InputError naming the fix when it is missing."""
    try:
        import nir
    except ImportError:
        raise InputError("--target nir needs the 'nir' package (pip install --no-deps "
                         "nir==1.0.8; it requires only numpy and h5py)") from None
    return nir


def require_normalised_float(snn: SnnGraph) -> None:
    """InputError unless every spiking threshold is 1 (an IF spike is then worth 1, as NIR
    assumes; run toolchain.normalize first)."""
    bad = [l.name for l in snn.layers
           if not l.readout and not np.allclose(l.threshold, 1.0, rtol=0, atol=1e-9)]
    if bad:
        raise InputError(f"NIR export needs a normalised SnnGraph (thresholds 1); run "
                         f"toolchain.normalize first. Layers with other thresholds: {bad}")


def ungrouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """(O, I/g, kH, kW) grouped kernel -> the equal (O, I, kH, kW) kernel, zero outside
    each output's group."""
    w = np.asarray(weight, dtype=np.float64)
    if groups == 1:
        return w.copy()
    o, ig, kh, kw = w.shape
    full = np.zeros((o, ig * groups, kh, kw))
    for g in range(groups):
        rows = slice(g * (o // groups), (g + 1) * (o // groups))
        full[rows, g * ig:(g + 1) * ig] = w[rows]
    return full


def synapse_node(syn: Synapse, src_shape: tuple[int, ...], bias: np.ndarray):
    """``nir.Conv2d`` or ``nir.Affine`` for one synapse."""
    nir = _nir()
    meta = {"source": syn.source, "kind": syn.kind.value}
    if syn.kind is SynapseKind.DENSE:
        return nir.Affine(weight=np.asarray(syn.weight, dtype=np.float64).copy(),
                          bias=bias, metadata=meta)
    meta["groups"] = int(syn.groups)
    return nir.Conv2d(input_shape=tuple(int(s) for s in src_shape[1:]),
                      weight=ungrouped(syn.weight, syn.groups), stride=tuple(syn.stride),
                      padding=tuple(syn.padding), dilation=tuple(syn.dilation), groups=1,
                      bias=bias, metadata=meta)


def per_neuron(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per-channel values broadcast to every neuron of ``shape``."""
    v = np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * (len(shape) - 1))
    return np.broadcast_to(v, shape).copy()


def neuron_metadata(layer: NeuronLayer, timesteps: int) -> dict[str, Any]:
    """What NIR's IF/I cannot say about this layer (module docstring)."""
    sched = (np.zeros((timesteps, layer.channels)) if layer.bias_schedule is None
             else np.asarray(layer.bias_schedule, dtype=np.float64))
    kind = "signed_subtract" if layer.signed else "if_subtract"
    meta = {"ftbc_neuron": "readout" if layer.readout else kind,
            "bias_schedule": sched.copy(), "v_init": np.asarray(layer.v_init, dtype=np.float64).copy(),
            "origin": layer.origin}
    if layer.readout:
        meta["output"] = "v after each step (accumulated input); prediction = argmax at T"
    else:
        meta.update(reset="subtract", compare=">=")
    if layer.signed:
        meta["negative_spike"] = ("s = -1 (v += theta) when v < 0 and the net spike count is "
                                  "> 0; -1 spikes are sent as signed events")
    return meta


def neuron_node(layer: NeuronLayer, timesteps: int):
    """``nir.IF`` (spiking) or ``nir.I`` (readout) with the per-neuron parameters."""
    nir, shape = _nir(), tuple(layer.shape)
    meta = neuron_metadata(layer, timesteps)
    if layer.readout:
        return nir.I(r=np.ones(shape), metadata=meta)
    return nir.IF(r=np.ones(shape), v_threshold=per_neuron(layer.threshold, shape),
                  v_reset=np.zeros(shape), metadata=meta)


def input_node(snn: SnnGraph):
    nir, spec = _nir(), snn.input
    meta: dict[str, Any] = {"encoding": "constant: the same analog sample at every step"}
    if spec.mean is not None:
        meta.update(transform="(x - mean) / std per channel, before the first synapses",
                    mean=np.asarray(spec.mean, dtype=np.float64).copy(),
                    std=np.asarray(spec.std, dtype=np.float64).copy())
    return nir.Input(input_type={"input": np.array(spec.shape)}, metadata=meta)


def graph_metadata(snn: SnnGraph) -> dict[str, Any]:
    from exporters.netx import meta_to_json
    return {"format": FORMAT, "version": VERSION, "timesteps": int(snn.timesteps),
            "neuron_equation": NEURON_EQUATION, "ftbc_meta": meta_to_json(snn.meta)}


def layer_nodes(layer: NeuronLayer, shapes: dict, nodes: dict, edges: list) -> None:
    """Add one layer's synapse (and flatten) nodes, its neuron node and their edges."""
    nir = _nir()
    for k, syn in enumerate(layer.synapses):
        src, src_shape = syn.source, shapes[syn.source]
        bias = np.asarray(layer.bias, dtype=np.float64) if k == 0 else np.zeros(layer.channels)
        if syn.kind is SynapseKind.DENSE and len(src_shape) > 1:
            flat = f"{src}.flatten"
            if flat not in nodes:
                nodes[flat] = nir.Flatten(input_type={"input": np.array(src_shape)},
                                          start_dim=0, end_dim=-1)
                edges.append((src, flat))
            src = flat
        name = f"{layer.name}.syn{k}"
        nodes[name] = synapse_node(syn, src_shape, bias.copy())
        edges += [(src, name), (name, layer.name)]


def to_nir(snn: SnnGraph):
    """The NIR graph of a normalised float SnnGraph (module docstring)."""
    nir = _nir()
    require_normalised_float(snn)
    if not snn.layers or not snn.readout.readout:
        raise InputError("NIR export: the last layer must be the readout")
    shapes = {INPUT: tuple(snn.input.shape), **{l.name: tuple(l.shape) for l in snn.layers}}
    nodes: dict[str, Any] = {INPUT: input_node(snn)}
    edges: list[tuple[str, str]] = []
    for layer in snn.layers:
        layer_nodes(layer, shapes, nodes, edges)
        nodes[layer.name] = neuron_node(layer, snn.timesteps)
    nodes["output"] = nir.Output(output_type={"output": np.array(snn.readout.shape)})
    edges.append((snn.readout.name, "output"))
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=graph_metadata(snn))


def write_nir(snn: SnnGraph, path: str | os.PathLike) -> None:
    """Write ``to_nir(snn)`` to ``path`` with ``nir.write``, atomically."""
    nir, path = _nir(), Path(path)
    graph = to_nir(snn)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
