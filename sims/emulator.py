"""Fast, batched, bit-exact emulator of ``sims.reference`` (the integer specification).

Why it is exact: every value is an integer held in a float tensor, and float arithmetic on
integers is exact while every intermediate stays within the mantissa (2**24 in float32,
2**53 in float64). A static bound chooses the dtype per synapse and per layer:

* synapse: every partial sum of ``sum_i w_oi * src_i`` is at most
  ``bound = max_o sum_i |w_oi| * max|src|`` (max|src| = 2**(P-1) for the graded input,
  1 for spikes): float32 when ``bound <= 2**24``, else float64;
* neuron: float32 when ``A <= 2**24`` (A bounds |a| summed over synapses, so a is exact),
  ``|bias| < 2**23``, ``|v_init| <= 2**23`` and ``0 < vth <= 2**23``; else float64 when every
  term is below 2**53. Why float32 suffices although ``v + (a << 6) + bias`` may exceed
  2**24: v enters each step clamped to [-2**23, 2**23); a sum whose exact value is at most
  2**24 in magnitude is computed exactly, and one beyond it is at least 2**23 away from the
  state range, so (float rounding being monotonic and 2**23 representable) the rounded
  value lands on the same side of the 24-bit clamp, which then gives the exact result.

Multiplying by a power of two (the ``<< 6``, ``<< weight_exp``) and ``floor(x / 2**e)`` are
exact in floating point, and the 24-bit clamps are applied exactly where the reference
applies them. Graphs whose bounds exceed 2**53 are refused.

Speed: the constant input is encoded once and each input synapse runs once per batch (its
current is the same at every step); spike synapses run one conv/matmul over (steps x batch)
rows per time chunk; the neuron loop over t is a few in-place tensor ops. A stride-s
convolution (or a dense layer) whose kernel is constant on aligned s x s blocks, which is
what folding an average pool into the next layer produces, is run as an exact integer
s x s sum-pool followed by the s-times-smaller kernel (same integers, s**2 fewer MACs).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from sims.progress import progress_bar
from sims.reference import INPUT_SHIFT, STATE_MAX, STATE_MIN, encode_input
from toolchain.errors import InputError
from toolchain.ir import INPUT, QLayer, QSynapse, QuantGraph

PAYLOAD_BITS = 8  # graded-spike payload of the input encoding (reference.encode_input)
F32_EXACT = float(1 << 24)
F64_EXACT = float(1 << 53)
SHIFT = float(1 << INPUT_SHIFT)  # the << 6 as an exact float multiply
CHUNK_ELEMENTS = 1 << 22  # time-chunk size: steps x batch x neurons per layer (16 MB float32)


@dataclass(frozen=True)
class EmuResult:
    """Emulation of N samples over T steps.

    ``accuracy`` (T,) percent correct after each step (None without labels);
    ``predictions`` (T, N) argmax of the readout; ``readout`` (T, N, K) int64 readout
    membrane after each step; ``spike_counts`` layer -> mean spikes per sample (all steps,
    all neurons); ``saturations`` layer -> number of 24-bit membrane clamps;
    ``synapse_clamps`` layer -> number of 24-bit synaptic-output clamps (0 when
    ``validate`` passed); ``neuron_spikes`` layer -> (n,) int64 spikes of each neuron over
    all samples and steps (the activity the netlist's synops come from); ``spikes`` layer
    -> (T, N, n) uint8 when ``record=True``."""
    accuracy: np.ndarray | None
    predictions: np.ndarray
    readout: np.ndarray
    spike_counts: Mapping[str, float]
    saturations: Mapping[str, int]
    synapse_clamps: Mapping[str, int]
    neuron_spikes: Mapping[str, np.ndarray]
    spikes: Mapping[str, np.ndarray] | None = None

    @property
    def readout_trace(self) -> np.ndarray:
        """(N, T, K) int64: sample i's readout in ``reference_run``'s (T, n) layout."""
        return self.readout.transpose(1, 0, 2)


# --------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class SynPlan:
    """One synapse ready to run: float weights (dense stored as (n_in, O)), optional
    sum-pool factor applied to the source first, static bound and dtype."""
    source: str
    kind: str
    weight: torch.Tensor
    src_shape: tuple[int, ...]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pool: int
    weight_exp: int
    bound: float
    dtype: torch.dtype

    @property
    def clamps(self) -> bool:
        """True when the 24-bit synaptic clamp can bind (bound above STATE_MAX)."""
        return self.bound > STATE_MAX

    @property
    def out_bound(self) -> float:
        """Bound on |a| after the clamp and the weight exponent."""
        return math.ldexp(min(self.bound, -STATE_MIN), self.weight_exp)


@dataclass(frozen=True)
class LayerPlan:
    """One layer ready to run; per-channel arrays expanded only at use."""
    name: str
    n: int
    channels: int
    synapses: tuple[SynPlan, ...]
    bias: torch.Tensor      # (T, C) effective bias bias_mant << bias_exp
    v_init: torch.Tensor    # (C,)
    vth: torch.Tensor       # (n,) per neuron (per-channel thresholds expanded)
    readout: bool
    dtype: torch.dtype


def static_bound(weight: np.ndarray, src_max: float) -> float:
    """max over outputs of sum_i |w_oi| * src_max (bounds every partial sum)."""
    w = np.abs(weight.astype(np.float64)).reshape(weight.shape[0], -1)
    return float(w.sum(axis=1).max(initial=0.0)) * src_max


def exact_dtype(bound: float, what: str) -> torch.dtype:
    """float32 if every value is an integer <= 2**24, float64 if <= 2**53."""
    if bound <= F32_EXACT:
        return torch.float32
    if bound <= F64_EXACT:
        return torch.float64
    raise InputError(f"{what}: integer bound {bound:.3g} exceeds 2**53; cannot emulate exactly")


def _blocks_constant(w: np.ndarray, s: int) -> bool:
    """True if the last two axes of ``w`` are constant on aligned s x s blocks."""
    *lead, h, wd = w.shape
    if h % s or wd % s:
        return False
    blocks = w.reshape(*lead, h // s, s, wd // s, s)
    return bool(np.all(blocks == blocks[..., :1, :, :1]))


def pool_factor(syn: QSynapse, src_shape: tuple[int, ...]) -> int:
    """Sum-pool factor s > 1 if ``syn`` equals an s x s sum-pool then a smaller map, else 1."""
    if syn.source == INPUT or len(src_shape) != 3 or src_shape[1] % 2 or src_shape[2] % 2:
        return 1
    w = syn.weight
    if syn.kind == "dense":
        return 2 if _blocks_constant(w.reshape(w.shape[0], *src_shape), 2) else 1
    (sh, sw), (ph, pw) = syn.stride, syn.padding
    ok = (sh == sw == 2 and syn.dilation == (1, 1) and ph % 2 == 0 and pw % 2 == 0
          and _blocks_constant(w, 2))
    return 2 if ok else 1


def pooled_weight(syn: QSynapse, src_shape: tuple[int, ...], s: int) -> np.ndarray:
    """The s-times-smaller kernel of a block-constant weight (one value per block)."""
    if s == 1:
        return syn.weight
    if syn.kind == "dense":
        return syn.weight.reshape(-1, *src_shape)[..., ::s, ::s].reshape(syn.weight.shape[0], -1)
    return syn.weight[..., ::s, ::s]


def plan_synapse(syn: QSynapse, src_shape: tuple[int, ...], src_max: float,
                 what: str) -> SynPlan:
    """Precompute a synapse's float weights, pooling and exactness dtype."""
    bound = static_bound(syn.weight, src_max)
    dtype = exact_dtype(bound, what)
    s = pool_factor(syn, src_shape)
    w = torch.from_numpy(pooled_weight(syn, src_shape, s).astype(np.float64)).to(dtype)
    geometry = (syn.stride, syn.padding) if s == 1 else ((1, 1), (syn.padding[0] // s,
                                                                   syn.padding[1] // s))
    return SynPlan(source=syn.source, kind=syn.kind,
                   weight=w.t().contiguous() if syn.kind == "dense" else w.contiguous(),
                   src_shape=tuple(src_shape), stride=tuple(geometry[0]),
                   padding=tuple(geometry[1]), dilation=tuple(syn.dilation),
                   groups=int(syn.groups), pool=s, weight_exp=int(syn.weight_exp),
                   bound=bound, dtype=dtype)


def membrane_dtype(layer: QLayer, syns: tuple[SynPlan, ...], bias: np.ndarray) -> torch.dtype:
    """float32 when the neuron update is provably exact in it (module docstring), else
    float64 (exact below 2**53)."""
    a_max = sum(s.out_bound for s in syns)
    b_max = float(np.abs(bias).max(initial=0))
    v_max = float(np.abs(layer.v_init.astype(np.float64)).max(initial=0))
    vth_max = float(np.abs(np.asarray(layer.vth, dtype=np.float64)).max(initial=0))
    if (a_max <= F32_EXACT and b_max < -STATE_MIN and v_max <= -STATE_MIN
            and (layer.readout or (0 < vth_max <= -STATE_MIN and np.all(layer.vth > 0)))):
        return torch.float32
    bound = max(v_max, -STATE_MIN) + math.ldexp(a_max, INPUT_SHIFT) + b_max + vth_max
    return exact_dtype(bound, f"layer {layer.name} membrane")


def plan_layer(layer: QLayer, shapes: Mapping[str, tuple[int, ...]]) -> LayerPlan:
    """Precompute a layer: synapse plans, effective bias, dynamics dtype."""
    payload = float(1 << (PAYLOAD_BITS - 1))
    syns = tuple(plan_synapse(s, shapes[s.source], payload if s.source == INPUT else 1.0,
                              f"layer {layer.name} <- {s.source}") for s in layer.synapses)
    bias = layer.bias_mant.astype(np.float64) * 2.0 ** layer.bias_exp
    dtype = membrane_dtype(layer, syns, bias)
    return LayerPlan(name=layer.name, n=int(np.prod(layer.shape)), channels=layer.shape[0],
                     synapses=syns, bias=torch.from_numpy(bias).to(dtype),
                     v_init=torch.from_numpy(layer.v_init.astype(np.float64)).to(dtype),
                     vth=neuron_thresholds(layer).to(dtype), readout=layer.readout,
                     dtype=dtype)


def neuron_thresholds(layer: QLayer) -> torch.Tensor:
    """(n,) per-neuron thresholds: the per-channel vth repeated over positions (C order)."""
    n = int(np.prod(layer.shape))
    vth = np.broadcast_to(np.asarray(layer.vth, dtype=np.float64), layer.shape[:1])
    return torch.from_numpy(np.repeat(vth, n // layer.shape[0]))


def plan_graph(q: QuantGraph) -> tuple[LayerPlan, ...]:
    """Plans of every layer in topological order."""
    shapes = {INPUT: tuple(q.input.shape), **{l.name: tuple(l.shape) for l in q.layers}}
    return tuple(plan_layer(layer, shapes) for layer in q.layers)


# --------------------------------------------------------------------------- synapses

def sum_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Exact s x s sum-pool of (N, C, H, W), H and W multiples of s: rows first (contiguous
    inner axis, fast), then columns."""
    rows = x[..., 0::s, :].clone()
    for i in range(1, s):
        rows += x[..., i::s, :]
    out = rows[..., 0::s].clone()
    for j in range(1, s):
        out += rows[..., j::s]
    return out


def linear_map(p: SynPlan, src: torch.Tensor) -> torch.Tensor:
    """``sum_i w_oi * src_i`` for rows of ``src`` (rows, *src_shape) -> (rows, n_out)."""
    x = src.to(p.dtype)
    if p.pool > 1:
        x = sum_pool(x.reshape(-1, *p.src_shape), p.pool)
    if p.kind == "dense":
        return x.reshape(x.shape[0], -1) @ p.weight
    out = F.conv2d(x.reshape(-1, *p.src_shape) if p.pool == 1 else x, p.weight, None,
                   p.stride, p.padding, p.dilation, p.groups)
    return out.reshape(out.shape[0], -1)


def synapse_current(p: SynPlan, src: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Reference ``synapse_output`` on rows: clamp to 24 bits, then the weight exponent.
    Returns the current and how many outputs the clamp changed."""
    acc, clamped = linear_map(p, src), 0
    if p.clamps:
        clamped = int(((acc > STATE_MAX) | (acc < STATE_MIN)).sum())
        acc = acc.clamp_(STATE_MIN, STATE_MAX)
    if p.weight_exp == 0:
        return acc, clamped
    if p.weight_exp > 0:
        return acc.mul_(2.0 ** p.weight_exp), clamped
    return torch.floor_(acc.mul_(2.0 ** p.weight_exp)), clamped


def summed_current(lp: LayerPlan, sources: Mapping[str, torch.Tensor], rows: int,
                   clamps: dict[str, int], weight: int) -> torch.Tensor | None:
    """Sum of a layer's synapse currents from the given sources, (rows, n) in the layer's
    dtype (None if no synapse reads them); ``weight`` counts how often each clamp applies."""
    total = None
    for p in lp.synapses:
        if p.source in sources:
            cur, clamped = synapse_current(p, sources[p.source].reshape(-1, *p.src_shape))
            clamps[lp.name] += clamped * weight
            cur = cur.to(lp.dtype).reshape(rows, -1)
            total = cur if total is None else total.add_(cur)
    return total


def input_current(lp: LayerPlan, inputs: torch.Tensor, steps: int,
                  clamps: dict[str, int]) -> torch.Tensor | None:
    """(B, n) current from the constant graded input: computed once, used at every step."""
    return summed_current(lp, {INPUT: inputs}, inputs.shape[0], clamps, steps)


def spike_current(lp: LayerPlan, outputs: Mapping[str, torch.Tensor], steps: int, batch: int,
                  clamps: dict[str, int]) -> torch.Tensor | None:
    """(steps, B, n) current from upstream spikes of this time chunk."""
    total = summed_current(lp, outputs, steps * batch, clamps, 1)
    return None if total is None else total.view(steps, batch, -1)


# --------------------------------------------------------------------------- neurons

def count_ones(x: torch.Tensor) -> int:
    """Number of ones in a 0/1 float tensor: float32 row sums (exact, rows < 2**24 long),
    then a float64 sum of the rows (exact). Much faster than bool or float64 reductions."""
    return int(x.reshape(-1, x.shape[-1]).sum(dim=1).sum(dtype=torch.float64))


def clamp_state(v: torch.Tensor, scratch: torch.Tensor) -> int:
    """Clamp v in place to 24 bits; returns how many values it changed. ``aminmax`` first
    (the clamp rarely binds) and only the violated side is counted."""
    lo, hi = torch.aminmax(v)
    count = 0
    if hi > STATE_MAX:
        count += count_ones(torch.gt(v, STATE_MAX, out=scratch))
    if lo < STATE_MIN:
        count += count_ones(torch.lt(v, STATE_MIN, out=scratch))
    if count:
        v.clamp_(STATE_MIN, STATE_MAX)
    return count


def step_drive(lp: LayerPlan, const: torch.Tensor | None, a: torch.Tensor | None,
               t0: int, steps: int) -> torch.Tensor:
    """(steps, B, n) ``(a << 6) + bias`` for a chunk with spike inputs (in place on a)."""
    if const is not None:
        a = a.add_(const)
    batch = a.shape[1]
    bias = lp.bias[t0:t0 + steps].reshape(steps, 1, lp.channels, 1)
    return a.mul_(SHIFT).view(steps, batch, lp.channels, -1).add_(bias).view(steps, batch, -1)


def run_neurons(lp: LayerPlan, drive: torch.Tensor, v: torch.Tensor, t0: int,
                out: torch.Tensor, scratch: torch.Tensor) -> int:
    """Reference ``run_layer`` for the steps t0.. of a chunk: v += (a << 6) + bias; clamp;
    spike if v >= vth and subtract vth (readout: out = v). ``drive`` is (steps, B, n) from
    ``step_drive``, or (B, n) ``a << 6`` of a constant-input layer (bias added per step).
    ``scratch`` is a buffer shaped like v. Returns the clamp count."""
    steps, batch = out.shape[0], v.shape[0]
    const, saturated = drive.dim() == 2, 0
    vc = v.view(batch, lp.channels, -1)
    for t in range(steps):
        if const:
            v.add_(drive)
            vc.add_(lp.bias[t0 + t].view(lp.channels, 1))
        else:
            v.add_(drive[t])
        saturated += clamp_state(v, scratch)
        if lp.readout:
            out[t].copy_(v)
        else:
            torch.ge(v, lp.vth, out=out[t])
            v.addcmul_(out[t], lp.vth, value=-1)
    return saturated


def initial_state(lp: LayerPlan, batch: int) -> torch.Tensor:
    """(B, n) membrane at t = 0: v_init per channel, repeated over positions."""
    per = lp.n // lp.channels
    return lp.v_init.repeat_interleave(per).expand(batch, lp.n).clone()


# --------------------------------------------------------------------------- batches

@dataclass
class _Totals:
    """Running totals over batches (mutable accumulator, private): per spiking layer the
    spikes of each neuron (float64, exact integers), saturation and clamp counts."""
    neurons: dict[str, torch.Tensor]
    saturations: dict[str, int]
    clamps: dict[str, int]


def chunk_steps(plans: tuple[LayerPlan, ...], steps: int, batch: int) -> int:
    """Steps per time chunk: spike tensors stay under CHUNK_ELEMENTS per layer (also keeps
    buffers below glibc's mmap threshold, so memory is reused instead of re-faulted)."""
    widest = max(lp.n for lp in plans)
    return max(1, min(steps, CHUNK_ELEMENTS // max(1, widest * batch)))


def run_batch(plans: tuple[LayerPlan, ...], x_int: np.ndarray, steps: int, totals: _Totals,
              record: dict[str, np.ndarray] | None, row0: int) -> np.ndarray:
    """Emulate one batch of encoded samples; returns the readout (T, B, K) int64 and
    adds to ``totals`` (and ``record``: spikes at rows row0..)."""
    batch, size = x_int.shape[0], chunk_steps(plans, steps, x_int.shape[0])
    inputs = torch.from_numpy(x_int.astype(np.float32))
    state = {lp.name: initial_state(lp, batch) for lp in plans}
    const = {lp.name: input_current(lp, inputs, steps, totals.clamps) for lp in plans}
    spiking = {lp.name: any(p.source != INPUT for p in lp.synapses) for lp in plans}
    buffers = {lp.name: (torch.empty((size, batch, lp.n), dtype=lp.dtype),
                         torch.empty((batch, lp.n), dtype=lp.dtype)) for lp in plans}
    readout = np.zeros((steps, batch, plans[-1].n), dtype=np.int64)
    for t0 in range(0, steps, size):
        chunk, outputs = range(t0, min(steps, t0 + size)), {}
        for lp in plans:
            c = const[lp.name]
            if spiking[lp.name]:
                a = spike_current(lp, outputs, len(chunk), batch, totals.clamps)
                drive = step_drive(lp, c, a, chunk.start, len(chunk))
            else:
                drive = const[lp.name] = c if chunk.start else c.mul_(SHIFT)  # a << 6, once
            out, scratch = buffers[lp.name][0][:len(chunk)], buffers[lp.name][1]
            totals.saturations[lp.name] += run_neurons(lp, drive, state[lp.name], chunk.start,
                                                       out, scratch)
            outputs[lp.name] = out
            collect(lp, out, chunk, totals, record, row0, readout)
    return readout


def collect(lp: LayerPlan, out: torch.Tensor, chunk: range, totals: _Totals,
            record: dict[str, np.ndarray] | None, row0: int, readout: np.ndarray) -> None:
    """Store a chunk's readout values, spike totals and (optionally) spike records."""
    if lp.readout:
        readout[chunk.start:chunk.stop] = out.to(torch.float64).numpy().astype(np.int64)
        return
    # per-neuron counts: float32 column sums are exact (a chunk has < 2**24 rows)
    totals.neurons[lp.name] += out.reshape(-1, out.shape[-1]).sum(dim=0)
    if record is not None:
        rows = slice(row0, row0 + out.shape[1])
        record[lp.name][chunk.start:chunk.stop, rows] = out.to(torch.uint8).numpy()


@contextlib.contextmanager
def exact_float_math() -> Iterator[None]:
    """Full-precision float32 matmul/conv (no TF32/bf16 shortcuts) inside the block."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_inputs(q: QuantGraph, x: np.ndarray, y: np.ndarray | None) -> None:
    """InputError for shapes that do not match the graph."""
    if x.shape[1:] != tuple(q.input.shape):
        raise InputError(f"emulate: samples have shape {x.shape[1:]}, the network expects "
                         f"{tuple(q.input.shape)}")
    if not q.layers or not q.layers[-1].readout:
        raise InputError("emulate: the last layer must be the readout")
    if y is not None and len(y) != len(x):
        raise InputError(f"emulate: {len(x)} samples but {len(y)} labels")


def emulate(q: QuantGraph, x: np.ndarray, y: np.ndarray | None = None, *,
            batch_size: int = 256, record: bool = False, progress: bool = False) -> EmuResult:
    """Run ``q`` on float samples ``x`` (N, *input shape), bit-exact with
    ``sims.reference`` (input encoded by ``reference.encode_input``)."""
    x = np.asarray(x)
    check_inputs(q, x, y)
    plans, steps, n = plan_graph(q), q.timesteps, len(x)
    totals = _Totals({lp.name: torch.zeros(lp.n, dtype=torch.float64)
                      for lp in plans if not lp.readout},
                     {lp.name: 0 for lp in plans}, {lp.name: 0 for lp in plans})
    spikes = ({lp.name: np.zeros((steps, n, lp.n), np.uint8) for lp in plans if not lp.readout}
              if record else None)
    readout = np.zeros((steps, n, plans[-1].n), dtype=np.int64)
    with exact_float_math(), progress_bar(n, "emulate", progress) as bar, torch.no_grad():
        for start in range(0, n, batch_size):
            x_int = encode_input(q.input, x[start:start + batch_size], PAYLOAD_BITS)
            readout[:, start:start + len(x_int)] = run_batch(plans, x_int, steps, totals,
                                                             spikes, start)
            bar.update(len(x_int))
    return make_result(readout, y, totals, spikes, n)


def make_result(readout: np.ndarray, y: np.ndarray | None, totals: _Totals,
                spikes: dict[str, np.ndarray] | None, n: int) -> EmuResult:
    """Predictions (argmax, first index on ties), accuracy and per-layer totals."""
    predictions = readout.argmax(axis=2)
    accuracy = None
    if y is not None:
        accuracy = (predictions == np.asarray(y)[None, :]).mean(axis=1) * 100.0
    return EmuResult(accuracy=accuracy, predictions=predictions, readout=readout,
                     spike_counts={k: float(v.sum()) / max(n, 1)
                                   for k, v in totals.neurons.items()},
                     neuron_spikes={k: v.numpy().astype(np.int64)
                                    for k, v in totals.neurons.items()},
                     saturations=dict(totals.saturations),
                     synapse_clamps=dict(totals.clamps), spikes=spikes)


