"""Float SNN simulator: batched over samples, vectorised over neurons, exact IR semantics.

For layer l, channel c, step t = 1..T (``toolchain.ir`` SnnGraph docstring)::

    I[t] = sum_syn W_syn * out_src[t]     out_src = theta_src * s_src[t]  (spike carries theta),
                                          or the (normalised) analog input x at every step
    v    = ((v + I[t]) + bias[c]) + bias_schedule[t-1, c]
    s[t] = v >= theta[c];   v = v - theta[c] * s[t]          (reset by subtraction)
    v[0] = v_init[c] * theta[c]

The readout (``readout=True``) has no compare and no reset; its output after step t is v and
the prediction is argmax(v). The analog input's synaptic current is the same at every step,
so it is computed once per batch. A layer's currents for a chunk of steps come from one
batched conv/matmul over (steps * batch) samples; only the membrane update loops over t.

The building blocks (``encode_input``, ``synapse_current``, ``layer_currents``,
``neuron_params``, ``layer_step``, ``run_layer``, ``layer_output``, ``run_network``) are public
so calibration can reuse them on cached upstream spike trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from sims.progress import progress_bar
from toolchain.ir import INPUT, InputSpec, NeuronLayer, SnnGraph, Synapse

CHUNK_ELEMENTS = 1 << 23  # values per batched synapse call (bounds temporary memory)


@dataclass(frozen=True, eq=False)
class SimResult:
    """``accuracy`` (T,) percent after each step (None without labels); ``predictions``
    (T, N) int64; ``spike_counts`` mean spikes per sample over all T, per spiking layer;
    ``spikes`` layer -> (T, N, *shape) uint8 when requested."""
    accuracy: np.ndarray | None
    predictions: np.ndarray
    spike_counts: Mapping[str, float]
    spikes: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True, eq=False)
class NeuronParams:
    """One layer's per-channel parameters as tensors shaped to broadcast over (B, *shape);
    ``schedule`` is (T, C, 1, ...) (zeros when the layer has none)."""
    theta: torch.Tensor
    bias: torch.Tensor
    schedule: torch.Tensor
    v_init: torch.Tensor
    readout: bool


@dataclass(frozen=True, eq=False)
class NetworkRun:
    """One batch through the whole network: readout membrane (T, B, F), total spikes per
    spiking layer, and the spike trains (T, B, *shape) bool when kept."""
    readout: torch.Tensor
    spike_totals: Mapping[str, float]
    spikes: Mapping[str, torch.Tensor] | None


# --------------------------------------------------------------------------- building blocks

def _tensor(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(np.asarray(arr), dtype=dtype)


def channel_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C, 1, 1) for a (C, H, W) layer, (F,) for a flat one: per-channel broadcasting."""
    return (shape[0],) + (1,) * (len(shape) - 1)


def encode_input(spec: InputSpec, x: np.ndarray | torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x' = (x - mean) / std per channel (when the model has an input transform)."""
    x = torch.from_numpy(np.array(x, copy=True)).to(dtype)  # data arrays are read-only
    if spec.mean is None:
        return x
    view = (1,) + channel_shape(tuple(spec.shape))
    return (x - _tensor(spec.mean, dtype).reshape(view)) / _tensor(spec.std, dtype).reshape(view)


def synapse_current(syn: Synapse, values: torch.Tensor) -> torch.Tensor:
    """``values`` (N, *source shape) -> (N, *target shape): conv2d or dense on the flattened
    source (C order). No bias: biases belong to the neuron layer."""
    w = _tensor(syn.weight, values.dtype)
    if syn.kind == "dense":
        return values.reshape(values.shape[0], -1) @ w.T
    return F.conv2d(values, w, None, syn.stride, syn.padding, syn.dilation, syn.groups)


def neuron_params(layer: NeuronLayer, timesteps: int,
                  dtype: torch.dtype = torch.float32) -> NeuronParams:
    """Tensors of one layer; a missing bias schedule is zeros (T, C)."""
    view = channel_shape(tuple(layer.shape))
    sched = (np.zeros((timesteps, layer.channels)) if layer.bias_schedule is None
             else layer.bias_schedule)
    theta = _tensor(layer.threshold, dtype).reshape(view)
    return NeuronParams(theta=theta, bias=_tensor(layer.bias, dtype).reshape(view),
                        schedule=_tensor(sched, dtype).reshape((timesteps,) + view),
                        v_init=_tensor(layer.v_init, dtype).reshape(view) * theta,
                        readout=layer.readout)


def initial_membrane(p: NeuronParams, batch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """v[0] = v_init * theta, (B, *shape)."""
    return p.v_init.expand((batch,) + tuple(shape)).clone()


def fire(v: torch.Tensor, theta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Spikes of membrane ``v``: ``v >= theta`` as 0.0 / 1.0 in v's dtype, into ``out`` (new
    when None; may be ``v``'s own storage only if v is not needed afterwards). The same
    comparison as a bool ``v >= theta``, 3-4x faster on CPU (a bool result is not stored
    vectorised), and ready to multiply."""
    return torch.ge(v, theta, out=torch.empty_like(v) if out is None else out)


def layer_step(p: NeuronParams, v: torch.Tensor, current: torch.Tensor,
               t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One step (t 0-based): returns (new v, spikes bool); the readout returns (v, v)."""
    v = (v + current).add_(p.bias).add_(p.schedule[t])  # ((v + I) + bias) + b[t]
    if p.readout:
        return v, v
    fired = fire(v, p.theta)
    # v - theta where it fired, in place: the same values as torch.where(spikes, v - theta, v)
    # (x - 1 * theta, x - 0 * theta = x exactly), several times faster on CPU.
    return v.addcmul_(fired, p.theta, value=-1), fired.bool()


def run_layer(p: NeuronParams, currents: torch.Tensor, v: torch.Tensor,
              t0: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps t0 .. t0 + k - 1 on ``currents`` (k, B, *shape) (or (B, *shape), the same at every
    step). Returns (outputs (k, B, *shape): spikes bool or readout v, final v)."""
    steps = currents.shape[0] if currents.dim() == v.dim() + 1 else None
    k = steps if steps is not None else 1
    outs = []
    for i in range(k):
        cur = currents[i] if steps is not None else currents
        v, out = layer_step(p, v, cur, t0 + i)
        outs.append(out)
    return torch.stack(outs), v


def _source_shape(snn: SnnGraph, name: str) -> tuple[int, ...]:
    return tuple(snn.input.shape) if name == INPUT else tuple(snn.layer(name).shape)


def chunk_steps(snn: SnnGraph, layer: NeuronLayer, batch: int) -> int:
    """Steps per batched synapse call so that one call holds <= CHUNK_ELEMENTS values."""
    sizes = [int(np.prod(_source_shape(snn, s.source))) for s in layer.synapses]
    per_step = batch * max(sizes + [int(np.prod(layer.shape))])
    return max(1, min(snn.timesteps, CHUNK_ELEMENTS // max(per_step, 1)))


def input_current(layer: NeuronLayer, x_enc: torch.Tensor) -> torch.Tensor | None:
    """The constant current (B, *shape) from the analog input's synapses (None if none)."""
    parts = [synapse_current(s, x_enc) for s in layer.synapses if s.source == INPUT]
    return torch.stack(parts).sum(0) if parts else None


def layer_currents(snn: SnnGraph, layer: NeuronLayer, spikes: Mapping[str, torch.Tensor],
                   t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Currents (t1 - t0, B, *shape) of steps t0..t1-1 from the spiking sources (their
    spikes (T, B, *shape) bool, times theta_src); None when all sources are the input."""
    total = None
    for syn in layer.synapses:
        if syn.source == INPUT:
            continue
        src = snn.layer(syn.source)
        s = spikes[syn.source][t0:t1]
        theta = _tensor(src.threshold, dtype).reshape(channel_shape(tuple(src.shape)))
        values = _float_copy(s, dtype).mul_(theta).reshape((-1,) + tuple(src.shape))
        cur = synapse_current(syn, values)
        cur = cur.reshape((t1 - t0, s.shape[1]) + tuple(layer.shape))
        total = cur if total is None else total.add_(cur)
    return total


def _float_copy(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A new ``dtype`` tensor of spikes ``s``; bool goes through uint8, whose conversion to
    float is several times faster than bool's (same values)."""
    return s.view(torch.uint8).to(dtype) if s.dtype == torch.bool else s.to(dtype, copy=True)


def _combine(steady: torch.Tensor | None, spiking: torch.Tensor | None) -> torch.Tensor:
    """spiking + steady (``spiking`` is a fresh tensor from ``layer_currents``: in place)."""
    if spiking is None:
        return steady
    return spiking if steady is None else spiking.add_(steady)


def layer_output(snn: SnnGraph, layer: NeuronLayer, x_enc: torch.Tensor,
                 spikes: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 params: NeuronParams | None = None) -> torch.Tensor:
    """All T steps of one layer given its sources' spike trains: (T, B, *shape) bool spikes,
    or the readout's membrane after each step (float). ``params`` overrides the layer's own
    (e.g. a candidate bias schedule)."""
    p = params if params is not None else neuron_params(layer, snn.timesteps, dtype)
    batch = x_enc.shape[0]
    v = initial_membrane(p, batch, tuple(layer.shape))
    steady = input_current(layer, x_enc)
    k = chunk_steps(snn, layer, batch)
    outs = []
    for t0 in range(0, snn.timesteps, k):
        t1 = min(t0 + k, snn.timesteps)
        cur = _combine(steady, layer_currents(snn, layer, spikes, t0, t1, dtype))
        if cur.dim() == v.dim():
            cur = cur.expand((t1 - t0,) + tuple(cur.shape))
        out, v = run_layer(p, cur, v, t0)
        outs.append(out)
    return torch.cat(outs)


def last_consumers(snn: SnnGraph) -> dict[str, int]:
    """Index of the last layer that reads each population."""
    last: dict[str, int] = {}
    for i, layer in enumerate(snn.layers):
        for syn in layer.synapses:
            last[syn.source] = i
    return last


@torch.no_grad()
def run_network(snn: SnnGraph, x: np.ndarray | torch.Tensor, *,
                dtype: torch.dtype = torch.float32, keep_spikes: bool = False) -> NetworkRun:
    """One batch through every layer; spike trains are freed after their last consumer
    unless ``keep_spikes``."""
    x_enc = encode_input(snn.input, x, dtype)
    last = last_consumers(snn)
    spikes: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    readout = None
    for i, layer in enumerate(snn.layers):
        out = layer_output(snn, layer, x_enc, spikes, dtype)
        if layer.readout:
            readout = out
            continue
        spikes[layer.name] = out
        totals[layer.name] = float(out.sum())
        if not keep_spikes:
            for name in [n for n in spikes if last.get(n, -1) <= i]:
                del spikes[name]
    return NetworkRun(readout, totals, spikes if keep_spikes else None)


# --------------------------------------------------------------------------- whole data set

def simulate(snn: SnnGraph, x: np.ndarray, y: np.ndarray | None = None, *,
             batch_size: int = 256, record_spikes: bool = False,
             dtype: torch.dtype = torch.float32, progress: bool = False) -> SimResult:
    """Run the SNN on every sample of ``x`` (N, *input shape) for T steps.

    Returns predictions after each step, accuracy per step (with ``y``), mean spikes per
    sample per layer, and (``record_spikes``) every layer's spike trains as uint8."""
    preds, totals, trains = [], {}, {}
    with progress_bar(len(x), "snn", progress) as bar:
        for start in range(0, len(x), batch_size):
            run = run_network(snn, x[start:start + batch_size], dtype=dtype,
                              keep_spikes=record_spikes)
            preds.append(run.readout.argmax(-1).numpy())
            for name, count in run.spike_totals.items():
                totals[name] = totals.get(name, 0.0) + count
            if record_spikes:
                for name, s in run.spikes.items():
                    trains.setdefault(name, []).append(s.to(torch.uint8).numpy())
            bar.update(min(batch_size, len(x) - start))
    predictions = np.concatenate(preds, axis=1).astype(np.int64)
    accuracy = None if y is None else 100.0 * (predictions == np.asarray(y)[None]).mean(1)
    counts = {name: total / max(len(x), 1) for name, total in totals.items()}
    spikes = {n: np.concatenate(p, axis=1) for n, p in trains.items()} if record_spikes else None
    return SimResult(accuracy, predictions, counts, spikes)
