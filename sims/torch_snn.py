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
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from core.ir import INPUT, InputSpec, SnnGraph, Synapse, SynapseKind
from sims import engine
from sims.engine import FloatArithmetic, LayerPlan, channel_view
from sims.progress import progress_bar

__all__ = ["SimResult", "NetworkRun", "encode_input", "synapse_current", "layer_output",
           "run_network", "simulate"]


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
    result = torch.empty((steps, batch, lp.n),
                         dtype=lp.dtype if lp.readout else engine.train_dtype(lp, torch.bool),
                         device=x_enc.device)
    t0 = 0
    for out in layer_chunks(lp, x_enc, spikes, steps, buffer):
        result[t0:t0 + len(out)].copy_(out)  # spikes: 0.0 / 1.0 -> bool
        t0 += len(out)
    return result.reshape((steps, batch) + lp.shape)


def layer_chunks(lp: LayerPlan, x_enc: torch.Tensor, spikes: Mapping[str, torch.Tensor],
                 steps: int, buffer: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """``layer_output`` one time chunk after the other: (k, B, n) outputs of consecutive
    steps, spikes as 0.0 / 1.0 in a scratch buffer that the next chunk overwrites (copy what
    you keep before asking for the next)."""
    batch = x_enc.shape[0]
    v, steady, k = _layer_start(lp, x_enc, steps)
    if buffer is None:
        buffer = torch.empty(chunk_elements(lp, steps, batch), dtype=lp.dtype, device=v.device)
    for t0 in range(0, steps, k):
        t1 = min(t0 + k, steps)
        out = buffer[:(t1 - t0) * batch * lp.n].view(t1 - t0, batch, lp.n)
        _run_chunk(lp, x_enc, spikes, 0, t0, t1, v, steady, out)
        yield out


def chunk_elements(lp: LayerPlan, steps: int, batch: int) -> int:
    """Values in one time chunk of ``layer_output``'s spike buffer."""
    return engine.float_chunk_steps(lp, steps, batch) * batch * lp.n


def _layer_start(lp: LayerPlan, x_enc: torch.Tensor, steps: int
                 ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """A layer's run before step 0: (membrane, constant input current, chunk length)."""
    batch = x_enc.shape[0]
    return (engine.initial_state(lp, batch), engine.input_current(lp, x_enc),
            engine.float_chunk_steps(lp, steps, batch))


def _run_chunk(lp: LayerPlan, x_enc: torch.Tensor, spikes: Mapping[str, torch.Tensor],
               first: int, t0: int, t1: int, v: torch.Tensor, steady: torch.Tensor | None,
               out: torch.Tensor) -> None:
    """Steps t0..t1-1 of a layer into ``out`` (k, B, n), advancing ``v``; the sources'
    ``spikes`` start at step ``first`` (0: whole trains; t0: windows of these steps)."""
    drive = layer_drive(lp, x_enc, spikes, t0 - first, t1 - first, steady)
    engine.run_steps(lp, drive, v, t0, out, torch.empty_like(engine.membrane(lp, v)))


class _Stream:
    """Every planned layer of one batch run in its own time chunks (``float_chunk_steps``,
    exactly the chunks ``layer_output`` uses, so every synapse call sees the same rows and
    the results are bit-identical), pulled on demand: a layer computes its next chunk once
    its sources have produced those steps, and a source's chunks are dropped once every
    consumer is past them. Memory is a few chunks per layer (each at most
    FLOAT_CHUNK_ELEMENTS values), whatever T.

    ``given``: spike trains (T, B, *shape) of layers already known (not recomputed);
    ``start``: the first layer to compute (earlier ones must be in ``given`` where read)."""

    def __init__(self, plan: engine.Plan, x_enc: torch.Tensor, steps: int,
                 given: Mapping[str, torch.Tensor] | None = None, start: int = 0,
                 keep: bool = False, layers: tuple[LayerPlan, ...] | None = None):
        self.layers = tuple(plan.layers if layers is None else layers)
        self.x, self.steps, self.batch, self.keep = x_enc, steps, x_enc.shape[0], keep
        self.given = dict(given or {})
        self.index = {lp.name: i for i, lp in enumerate(self.layers)}
        self.active = [i for i in range(start, len(self.layers))
                       if self.layers[i].name not in self.given]
        self.consumers: dict[str, list[int]] = {}
        for i in self.active:
            for p in self.layers[i].synapses:
                if p.source != INPUT:
                    self.consumers.setdefault(p.source, []).append(i)
        self.done = {i: 0 for i in self.active}
        self.chunks: dict[int, list[tuple[int, int, torch.Tensor]]] = {i: [] for i in
                                                                       self.active}
        self.state: dict[int, tuple] = {}
        self.totals: dict[str, int] = {}
        self.held = self.peak_held = 0  # spike values held in chunks, now and at most
        size = max([chunk_elements(self.layers[i], steps, self.batch) for i in self.active
                    if not self.layers[i].readout] + [1])
        self.buffer = torch.empty(size, dtype=plan.arithmetic.dtype, device=x_enc.device)

    def readout(self) -> torch.Tensor:
        """The last layer's output after every step: (T, B, *shape)."""
        last = self.active[-1]
        self.pull(last, self.steps)
        for i in self.active:  # layers no later layer reads (their spike totals)
            self.pull(i, self.steps)
        return self.train(last)

    def train(self, i: int) -> torch.Tensor:
        """Layer i's kept chunks as one (T, B, *shape) tensor (``keep`` or the readout)."""
        parts = [c for _, _, c in self.chunks[i]]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.reshape((self.steps, self.batch) + self.layers[i].shape)

    def pull(self, i: int, until: int) -> None:
        """Compute layer i's chunks until it has produced ``until`` steps."""
        lp = self.layers[i]
        if i not in self.state:
            self.state[i] = _layer_start(lp, self.x, self.steps)
        v, steady, k = self.state[i]
        while self.done[i] < until:
            t0 = self.done[i]
            t1 = min(t0 + k, self.steps)
            sources = {}
            for p in lp.synapses:
                if p.source != INPUT and p.source not in sources:
                    sources[p.source] = self.window(p.source, t0, t1)
            out = (torch.empty((t1 - t0, self.batch, lp.n), dtype=lp.dtype, device=v.device)
                   if lp.readout else
                   self.buffer[:(t1 - t0) * self.batch * lp.n].view(t1 - t0, self.batch, lp.n))
            _run_chunk(lp, self.x, sources, t0, t0, t1, v, steady, out)
            if not lp.readout:
                # 0.0 / 1.0 -> bool (signed: int8), out of the shared scratch buffer
                out = out.to(engine.train_dtype(lp, torch.bool))
                self.totals[lp.name] = self.totals.get(lp.name, 0) + int(
                    (out.abs() if lp.signed else out).sum())
            if lp.readout or self.keep or lp.name in self.consumers:
                self.chunks[i].append((t0, t1, out))
                self.held += 0 if lp.readout else out.numel()
                self.peak_held = max(self.peak_held, self.held)
            self.done[i] = t1
            for p in lp.synapses:
                if p.source in self.index and self.index[p.source] in self.chunks:
                    self.release(self.index[p.source])

    def window(self, name: str, t0: int, t1: int) -> torch.Tensor:
        """Steps t0..t1-1 of a source's spikes (T axis first)."""
        if name in self.given:
            return self.given[name][t0:t1]
        i = self.index[name]
        self.pull(i, t1)
        parts = [c[max(t0, a) - a:min(t1, b) - a] for a, b, c in self.chunks[i]
                 if a < t1 and b > t0]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def release(self, i: int) -> None:
        """Drop layer i's chunks that every consumer has read."""
        if self.keep or self.layers[i].readout:
            return
        low = min(self.done[c] for c in self.consumers.get(self.layers[i].name, []))
        self.held -= sum(c[2].numel() for c in self.chunks[i] if c[1] <= low)
        self.chunks[i] = [c for c in self.chunks[i] if c[1] > low]


@torch.no_grad()
def stream_readout(plan: engine.Plan, x_enc: torch.Tensor, steps: int,
                   given: Mapping[str, torch.Tensor], start: int,
                   layers: tuple[LayerPlan, ...] | None = None) -> torch.Tensor:
    """The readout (T, B, K) of ``layers`` (default the plan's) from layer ``start`` on, the
    earlier layers' spike trains read from ``given``; streamed in time chunks (``_Stream``),
    bit-identical to running the layers one after another over all T."""
    return _Stream(plan, x_enc, steps, given, start, layers=layers).readout()


@torch.no_grad()
def run_network(snn: SnnGraph, x: np.ndarray | torch.Tensor, *,
                dtype: torch.dtype = torch.float32, keep_spikes: bool = False,
                plan: engine.Plan | None = None) -> NetworkRun:
    """One batch through every layer, streamed in time chunks (``_Stream``: memory does not
    grow with T unless ``keep_spikes``, which returns every layer's whole spike trains).
    ``plan``: ``engine.compile(snn, FloatArithmetic(dtype), device)`` when already compiled."""
    plan = plan or engine.compile(snn, FloatArithmetic(dtype))
    x_enc = encode_input(snn.input, x, plan.arithmetic.dtype, plan.device)
    stream = _Stream(plan, x_enc, snn.timesteps, keep=keep_spikes)
    readout = stream.readout()
    totals = {lp.name: float(stream.totals.get(lp.name, 0)) for lp in plan.layers
              if not lp.readout}
    spikes = ({lp.name: stream.train(i) for i, lp in enumerate(plan.layers) if not lp.readout}
              if keep_spikes else None)
    return NetworkRun(readout, totals, spikes)


# --------------------------------------------------------------------------- whole data set

def simulate(snn: SnnGraph, x: np.ndarray, y: np.ndarray | None = None, *,
             batch_size: int = 256, record_spikes: bool = False,
             dtype: torch.dtype = torch.float32, progress: bool = False,
             device: str | torch.device | None = None) -> SimResult:
    """Run the SNN on every sample of ``x`` (N, *input shape) for T steps.

    Returns predictions after each step, accuracy per step (with ``y``), mean spikes per
    sample per layer, and (``record_spikes``) every layer's spike trains as uint8 (a signed
    layer's as int8); on any
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
                    dtype = torch.int8 if s.dtype == torch.int8 else torch.uint8
                    trains.setdefault(name, []).append(s.to(dtype).cpu().numpy())
            bar.update(min(batch_size, len(x) - start))
    predictions = np.concatenate(preds, axis=1).astype(np.int64)
    accuracy = None if y is None else 100.0 * (predictions == np.asarray(y)[None]).mean(1)
    counts = {name: total / max(len(x), 1) for name, total in totals.items()}
    spikes = {n: np.concatenate(p, axis=1) for n, p in trains.items()} if record_spikes else None
    return SimResult(accuracy, predictions, counts, spikes)
