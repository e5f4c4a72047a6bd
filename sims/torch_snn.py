"""Float SNN simulator: batched over samples, vectorised over neurons, exact IR semantics.

For layer l, channel c, step t = 1..T (``core.ir`` SnnGraph docstring)::

    I[t] = sum_syn W_syn * out_src[t]     out_src = theta_src * s_src[t]  (spike carries theta),
                                          or the (normalised) analog input x at every step
    v    = ((v + I[t]) + bias[c]) + bias_schedule[t-1, c]
    s[t] = v >= theta[c];   v = v - theta[c] * s[t]          (reset by subtraction)
    v[0] = v_init[c] * theta[c]

The readout (``readout=True``) has no compare and no reset; its output after step t is v and
the prediction is argmax(v). The arithmetic is ``sims.engine``'s float arithmetic (the same
step kernel as the emulator and both calibrations); this module drives it over a data set.
The analog input's synaptic current is the same at every step, so it is computed once per
batch. A layer's currents for a chunk of steps come from one batched conv/matmul over
(steps * batch) samples; only the membrane update loops over t.

``encode_input``, ``layer_output`` and ``run_network`` are public so calibration can reuse
them on cached upstream spike trains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from core.ir import InputSpec, SnnGraph, Synapse, SynapseKind
from sims import engine
from sims.engine import FloatArithmetic, LayerPlan, channel_view, last_consumers
from sims.progress import progress_bar

__all__ = ["SimResult", "NetworkRun", "encode_input", "synapse_current", "layer_output",
           "run_network", "simulate", "last_consumers"]


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
class NetworkRun:
    """One batch through the whole network: readout membrane (T, B, F), total spikes per
    spiking layer, and the spike trains (T, B, *shape) bool when kept."""
    readout: torch.Tensor
    spike_totals: Mapping[str, float]
    spikes: Mapping[str, torch.Tensor] | None


# --------------------------------------------------------------------------- building blocks

def encode_input(spec: InputSpec, x: np.ndarray | torch.Tensor,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> torch.Tensor:
    """x' = (x - mean) / std per channel (when the model has an input transform)."""
    x = torch.from_numpy(np.array(x, copy=True)).to(device=device, dtype=dtype)  # read-only
    if spec.mean is None:
        return x
    view = (1,) + channel_view(tuple(spec.shape))
    mean = torch.tensor(np.asarray(spec.mean), dtype=dtype, device=device).reshape(view)
    std = torch.tensor(np.asarray(spec.std), dtype=dtype, device=device).reshape(view)
    return (x - mean) / std


def synapse_current(syn: Synapse, values: torch.Tensor) -> torch.Tensor:
    """An IR synapse on ``values`` (N, *source shape) -> (N, *target shape): conv2d or dense
    on the flattened source (C order). No bias: biases belong to the neuron layer."""
    w = torch.tensor(np.asarray(syn.weight), dtype=values.dtype, device=values.device)
    if syn.kind is SynapseKind.DENSE:
        return values.reshape(values.shape[0], -1) @ w.T
    return F.conv2d(values, w, None, syn.stride, syn.padding, syn.dilation, syn.groups)


def layer_drive(lp: LayerPlan, x_enc: torch.Tensor, spikes: Mapping[str, torch.Tensor],
                t0: int, t1: int, steady: torch.Tensor | None) -> torch.Tensor:
    """Currents of steps t0..t1-1: (t1 - t0, B, n) from the spiking sources plus the
    constant ``steady`` input current, or (B, n) ``steady`` alone (the same every step)."""
    cur = engine.spike_current(lp, spikes, t1 - t0, x_enc.shape[0], t0=t0)
    if cur is None:
        return steady
    return cur if steady is None else cur.add_(steady)  # (cur: a fresh tensor)


def layer_output(lp: LayerPlan, x_enc: torch.Tensor, spikes: Mapping[str, torch.Tensor],
                 steps: int, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """All T steps of one planned float layer given its sources' spike trains: (T, B, *shape)
    bool spikes, or the readout's membrane after each step (float). ``buffer``: a flat
    scratch tensor of at least ``chunk_elements(lp, ...)`` values in the layer's dtype, reused
    across chunks and layers (a fresh tens-of-MB buffer per chunk would be page-faulted in
    every time)."""
    batch = x_enc.shape[0]
    v = engine.initial_state(lp, batch)
    scratch = torch.empty_like(v)
    steady = engine.input_current(lp, x_enc)
    k = engine.float_chunk_steps(lp, steps, batch)
    result = torch.empty((steps, batch, lp.n), dtype=lp.dtype if lp.readout else torch.bool,
                         device=v.device)
    if not lp.readout and buffer is None:
        buffer = torch.empty(chunk_elements(lp, steps, batch), dtype=lp.dtype, device=v.device)
    for t0 in range(0, steps, k):
        t1 = min(t0 + k, steps)
        out = (result[t0:t1] if lp.readout
               else buffer[:(t1 - t0) * batch * lp.n].view(t1 - t0, batch, lp.n))
        engine.run_steps(lp, layer_drive(lp, x_enc, spikes, t0, t1, steady), v, t0, out,
                         scratch)
        if not lp.readout:
            result[t0:t1].copy_(out)  # 0.0 / 1.0 -> bool
    return result.reshape((steps, batch) + lp.shape)


def chunk_elements(lp: LayerPlan, steps: int, batch: int) -> int:
    """Values in one time chunk of ``layer_output``'s spike buffer."""
    return engine.float_chunk_steps(lp, steps, batch) * batch * lp.n


@torch.no_grad()
def run_network(snn: SnnGraph, x: np.ndarray | torch.Tensor, *,
                dtype: torch.dtype = torch.float32, keep_spikes: bool = False,
                plan: engine.Plan | None = None) -> NetworkRun:
    """One batch through every layer; spike trains are freed after their last consumer
    unless ``keep_spikes``. ``plan``: ``engine.compile(snn, FloatArithmetic(dtype), device)``
    when already compiled."""
    plan = plan or engine.compile(snn, FloatArithmetic(dtype))
    x_enc = encode_input(snn.input, x, plan.arithmetic.dtype, plan.device)
    last = last_consumers(snn)
    spikes: dict[str, torch.Tensor] = {}
    totals: dict[str, float] = {}
    readout = None
    size = max(chunk_elements(lp, snn.timesteps, x_enc.shape[0]) for lp in plan.layers)
    buffer = torch.empty(size, dtype=plan.arithmetic.dtype, device=plan.device)
    for i, lp in enumerate(plan.layers):
        out = layer_output(lp, x_enc, spikes, snn.timesteps, buffer)
        if lp.readout:
            readout = out
            continue
        spikes[lp.name] = out
        totals[lp.name] = float(out.sum())
        if not keep_spikes:
            for name in [n for n in spikes if last.get(n, -1) <= i]:
                del spikes[name]
    return NetworkRun(readout, totals, spikes if keep_spikes else None)


# --------------------------------------------------------------------------- whole data set

def simulate(snn: SnnGraph, x: np.ndarray, y: np.ndarray | None = None, *,
             batch_size: int = 256, record_spikes: bool = False,
             dtype: torch.dtype = torch.float32, progress: bool = False,
             device: str | torch.device | None = None) -> SimResult:
    """Run the SNN on every sample of ``x`` (N, *input shape) for T steps.

    Returns predictions after each step, accuracy per step (with ``y``), mean spikes per
    sample per layer, and (``record_spikes``) every layer's spike trains as uint8; on any
    torch ``device`` (default cpu)."""
    preds, totals, trains = [], {}, {}
    plan = engine.compile(snn, FloatArithmetic(dtype), device)
    with progress_bar(len(x), "snn", progress) as bar:
        for start in range(0, len(x), batch_size):
            run = run_network(snn, x[start:start + batch_size], keep_spikes=record_spikes,
                              plan=plan)
            preds.append(run.readout.argmax(-1).cpu().numpy())
            for name, count in run.spike_totals.items():
                totals[name] = totals.get(name, 0.0) + count
            if record_spikes:
                for name, s in run.spikes.items():
                    trains.setdefault(name, []).append(s.to(torch.uint8).cpu().numpy())
            bar.update(min(batch_size, len(x) - start))
    predictions = np.concatenate(preds, axis=1).astype(np.int64)
    accuracy = None if y is None else 100.0 * (predictions == np.asarray(y)[None]).mean(1)
    counts = {name: total / max(len(x), 1) for name, total in totals.items()}
    spikes = {n: np.concatenate(p, axis=1) for n, p in trains.items()} if record_spikes else None
    return SimResult(accuracy, predictions, counts, spikes)
