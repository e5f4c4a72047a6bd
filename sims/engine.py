"""The neuron engine: one compiled form of a network and one step kernel, for every arithmetic.

``compile(graph, arithmetic, device) -> Plan`` turns an ``SnnGraph`` (float arithmetic) or a
``QuantGraph`` (the integer arithmetic of its target) into per-layer ``LayerPlan`` records whose
tensors live on ``device``. The float simulator (``sims.torch_snn``), the bit-exact emulator
(``sims.emulator``) and both calibrations (``toolchain.calibrate``, ``toolchain.calibrate_fixed``)
drive the same kernel::

    charge:  v += drive[t]  (+ bias, the float graph's static per-channel bias)
    settle:  v += b[t]      (per channel; skipped when the drive already carries it)
             v  = clamp(v, state range)           (integer arithmetic only)
             s  = v >= vth;  v -= s * vth         (readout: out = v, no compare, no reset)
             signed layers: s -= (v < 0) & (n > 0) before the reset, n += s (``sims.reference``)

A layer's state is its membrane v (B, n), or for a signed layer (2, B, n): v and the net spike
count n (``initial_state``; ``membrane`` gives v).

``run_steps`` is charge + settle over a chunk of steps; ``bias_sweep`` is FTBC's step (probe the
spikes with the current b[t], let the calibration move b[t], settle with the new one);
``bias_solve`` is its solved form (every batch charged, b[t] chosen from probes of all of them,
then every batch settled with it).
``sims.reference`` is the independent numpy specification of the integer arithmetic; Lava's
ProcessModel (``sims.lava_procs.models``) is the only other writing of the step.

Float arithmetic (``SnnGraph`` semantics, ``core.ir``): a spike carries its source's
threshold, ``v = ((v + I) + bias) + b[t]`` in that association order, no state clamp.

Integer arithmetic (``sims.reference`` for a ``Target``): every value is an integer held in a
float tensor, exact while every intermediate stays within the mantissa (2**24 in float32,
2**53 in float64). A static bound chooses the dtype per synapse and per layer:

* synapse: every partial sum of ``sum_i w_oi * src_i`` is at most
  ``bound = max_o sum_i |w_oi| * max|src|`` (max|src| = the target's payload maximum for the
  graded input, 1 for spikes): float32 when ``bound <= 2**24``, else float64;
* neuron: float32 when ``A <= 2**24`` (A bounds |a| summed over synapses, so a is exact),
  ``|bias| < 2**23``, ``|v_init| <= 2**23`` and ``0 < vth <= 2**23``; else float64 when every
  term is below 2**53. Why float32 suffices although ``v + (a << 6) + bias`` may exceed
  2**24: v enters each step clamped to [-2**23, 2**23); a sum whose exact value is at most
  2**24 in magnitude is computed exactly, and one beyond it is at least 2**23 away from the
  state range, so (float rounding being monotonic and 2**23 representable) the rounded
  value lands on the same side of the 24-bit clamp, which then gives the exact result.

Because every partial sum is an exact integer, any summation order gives the same result:
the integer arithmetic is exact on any device once TF32 (matmul and cuDNN) is off
(``exact_math``). Multiplying by a power of two (the input shift, ``<< weight_exp``) and
``floor(x / 2**e)`` are exact, and the clamps are applied exactly where the reference applies
them. Graphs whose bounds exceed 2**53 are refused. A stride-2 convolution (or a dense layer)
whose kernel is constant on aligned 2 x 2 blocks, which is what folding an average pool into
the next layer produces, is run as an exact integer sum-pool followed by the 2-times-smaller
kernel (same integers, 4x fewer MACs).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from core.errors import InputError
from core.ir import (INPUT, NeuronLayer, QLayer, QSynapse, QuantGraph, SnnGraph, Synapse,
                     SynapseKind)
from hw_targets import Target, get_target

F32_EXACT = float(1 << 24)
F64_EXACT = float(1 << 53)
FLOAT_CHUNK_ELEMENTS = 1 << 23  # float path: values per batched synapse call


# --------------------------------------------------------------------------- arithmetics

@dataclass(frozen=True)
class FloatArithmetic:
    """The float SnnGraph semantics in ``dtype``."""
    dtype: torch.dtype = torch.float32
    name: ClassVar[str] = "float"


@dataclass(frozen=True)
class IntegerArithmetic:
    """The integer arithmetic of a quantized ``target`` (``sims.reference``): every width and
    shift is read from the target."""
    target: Target
    name: ClassVar[str] = "integer"

    @property
    def state_min(self) -> int:
        return self.target.state_min

    @property
    def state_max(self) -> int:
        return self.target.state_max

    @property
    def shift(self) -> float:
        """The synaptic input shift (``<< act_shift``) as an exact float multiply."""
        return float(1 << self.target.act_shift)

    @property
    def payload_bits(self) -> int:
        return self.target.input_payload_bits


Arithmetic = Union[FloatArithmetic, IntegerArithmetic]


def integer_arithmetic(q: QuantGraph) -> IntegerArithmetic:
    """The arithmetic of the target ``q`` was quantized for."""
    return IntegerArithmetic(get_target(q.target))


# --------------------------------------------------------------------------- devices

def resolve_device(name: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` (InputError when torch sees no GPU) or ``auto`` (cuda when torch sees
    one, else cpu); None is cpu."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "cpu"):
        return torch.device("cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cpu":
            return torch.device("cpu")
    if name == "cuda" or str(name).startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r}: torch sees no CUDA GPU; use --device cpu or auto")
        return torch.device(name if name != "cuda" else f"cuda:{_local_gpu()}")
    raise InputError(f"unknown device {name!r}; valid: cpu, cuda, auto")


def _local_gpu() -> int:
    """The GPU of this process: torchrun's LOCAL_RANK (one rank per GPU), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """Full-precision float32 matmul and convolution inside the block: no TF32/bf16 shortcut
    in matmul or cuDNN, deterministic cuDNN algorithms (no benchmarking). The settings are
    restored afterwards."""
    cudnn = torch.backends.cudnn
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
             cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = False, True, False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]
        cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark = saved[2:]


# --------------------------------------------------------------------------- plans

@dataclass(frozen=True, eq=False)
class SynPlan:
    """One synapse ready to run. ``weight``: dense (n_in, O) for the integer arithmetic, (O,
    n_in) for the float one; conv (O, I/g, kH, kW). ``scale``: the float source threshold a
    spike carries, (C, 1, ...) (None for the integer arithmetic and the input). ``pool``: an
    exact sum-pool factor applied to the source first. ``bound``: the static bound on every
    partial sum (integer arithmetic; 0 for float)."""
    source: str
    kind: SynapseKind
    weight: torch.Tensor
    src_shape: tuple[int, ...]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    dtype: torch.dtype
    pool: int = 1
    weight_exp: int = 0
    bound: float = 0.0
    scale: torch.Tensor | None = None
    limits: tuple[int, int] | None = None

    @property
    def clamps(self) -> bool:
        """True when the synaptic clamp can bind (integer arithmetic, bound above the range)."""
        return self.limits is not None and self.bound > self.limits[1]

    @property
    def out_bound(self) -> float:
        """Bound on |a| after the clamp and the weight exponent."""
        return math.ldexp(min(self.bound, -self.limits[0]), self.weight_exp)


@dataclass(frozen=True, eq=False)
class LayerPlan:
    """One layer ready to run, in the flat (B, n) layout (C order) with per-channel values
    expanded only at use. ``schedule`` (T, C, 1) is the bias added at each step (float: the
    bias schedule; integer: ``bias_mant << bias_exp``); ``bias`` (C, 1) the float graph's
    static bias (None for the integer arithmetic); ``vth`` (n,) per neuron; ``v_init`` (C,) the
    membrane at t = 0 in state units; ``limits`` the state range (None: no clamp);
    ``shift`` the input shift as a multiplier (integer: ``1 << act_shift``); ``signed`` the
    signed neuron (its state carries the net spike count, ``initial_state``)."""
    name: str
    shape: tuple[int, ...]
    n: int
    channels: int
    synapses: tuple[SynPlan, ...]
    schedule: torch.Tensor
    bias: torch.Tensor | None
    v_init: torch.Tensor
    vth: torch.Tensor
    readout: bool
    dtype: torch.dtype
    limits: tuple[int, int] | None = None
    shift: float = 1.0
    signed: bool = False

    @property
    def spiking_inputs(self) -> bool:
        """True when some synapse reads spikes (not only the constant input)."""
        return any(p.source != INPUT for p in self.synapses)


@dataclass(frozen=True, eq=False)
class Plan:
    """A compiled network: its layers in topological order, for one arithmetic and device."""
    layers: tuple[LayerPlan, ...]
    arithmetic: Arithmetic
    device: torch.device
    timesteps: int

    def layer(self, name: str) -> LayerPlan:
        return next(lp for lp in self.layers if lp.name == name)


def compile(graph: SnnGraph | QuantGraph, arithmetic: Arithmetic | None = None,
            device: str | torch.device | None = None) -> Plan:
    """Compile ``graph`` for ``arithmetic`` (default: float32 for an SnnGraph, the integer
    arithmetic of its target for a QuantGraph) on ``device`` (default cpu)."""
    dev = resolve_device(device)
    if isinstance(graph, QuantGraph):
        arith = arithmetic or integer_arithmetic(graph)
        shapes = graph_shapes(graph)
        layers = tuple(plan_integer_layer(l, shapes, arith, dev) for l in graph.layers)
    else:
        arith = arithmetic or FloatArithmetic()
        layers = tuple(plan_float_layer(graph, l, arith, dev) for l in graph.layers)
    return Plan(layers, arith, dev, graph.timesteps)


def graph_shapes(graph: SnnGraph | QuantGraph) -> dict[str, tuple[int, ...]]:
    """Shape of every population, the input included."""
    return {INPUT: tuple(graph.input.shape), **{l.name: tuple(l.shape) for l in graph.layers}}


def last_consumers(graph: SnnGraph | QuantGraph) -> dict[str, int]:
    """Index of the last layer that reads each population."""
    last: dict[str, int] = {}
    for i, layer in enumerate(graph.layers):
        for syn in layer.synapses:
            last[syn.source] = i
    return last


def _tensor(arr, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(np.asarray(arr), dtype=dtype, device=device)


def channel_view(shape: tuple[int, ...]) -> tuple[int, ...]:
    """(C, 1, 1) for a (C, H, W) population, (F,) for a flat one: per-channel broadcasting."""
    return (shape[0],) + (1,) * (len(shape) - 1)


# --------------------------------------------------------------------------- float lowering

def plan_float_layer(snn: SnnGraph, layer: NeuronLayer, arith: FloatArithmetic,
                     device: torch.device, schedule: torch.Tensor | None = None) -> LayerPlan:
    """A float layer; ``schedule`` (T, C, 1) overrides the layer's own bias schedule (zeros when
    it has none)."""
    dtype, c = arith.dtype, layer.channels
    theta = _tensor(np.broadcast_to(np.asarray(layer.threshold), (c,)), dtype, device)
    if schedule is None:
        sched = (np.zeros((snn.timesteps, c)) if layer.bias_schedule is None
                 else layer.bias_schedule)
        schedule = _tensor(sched, dtype, device).reshape(snn.timesteps, c, 1)
    n = int(np.prod(layer.shape))
    return LayerPlan(name=layer.name, shape=tuple(layer.shape), n=n, channels=c,
                     synapses=tuple(_plan_float_synapse(snn, s, dtype, device)
                                    for s in layer.synapses),
                     schedule=schedule,
                     bias=_tensor(np.broadcast_to(layer.bias, (c,)), dtype, device).view(c, 1),
                     v_init=_tensor(np.broadcast_to(layer.v_init, (c,)), dtype, device) * theta,
                     vth=theta.repeat_interleave(n // c), readout=layer.readout, dtype=dtype,
                     signed=layer.signed)


def _plan_float_synapse(snn: SnnGraph, syn: Synapse, dtype: torch.dtype,
                        device: torch.device) -> SynPlan:
    scale = None
    if syn.source == INPUT:
        src_shape = tuple(snn.input.shape)
    else:
        src = snn.layer(syn.source)
        src_shape = tuple(src.shape)
        scale = _tensor(src.threshold, dtype, device).reshape(channel_view(src_shape))
    return SynPlan(source=syn.source, kind=syn.kind, weight=_tensor(syn.weight, dtype, device),
                   src_shape=src_shape, stride=tuple(syn.stride), padding=tuple(syn.padding),
                   dilation=tuple(syn.dilation), groups=int(syn.groups), dtype=dtype,
                   scale=scale)


# --------------------------------------------------------------------------- integer lowering

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
    if syn.kind is SynapseKind.DENSE:
        return 2 if _blocks_constant(w.reshape(w.shape[0], *src_shape), 2) else 1
    (sh, sw), (ph, pw) = syn.stride, syn.padding
    ok = (sh == sw == 2 and syn.dilation == (1, 1) and ph % 2 == 0 and pw % 2 == 0
          and _blocks_constant(w, 2))
    return 2 if ok else 1


def pooled_weight(syn: QSynapse, src_shape: tuple[int, ...], s: int) -> np.ndarray:
    """The s-times-smaller kernel of a block-constant weight (one value per block)."""
    if s == 1:
        return syn.weight
    if syn.kind is SynapseKind.DENSE:
        return syn.weight.reshape(-1, *src_shape)[..., ::s, ::s].reshape(syn.weight.shape[0], -1)
    return syn.weight[..., ::s, ::s]


def plan_integer_synapse(syn: QSynapse, src_shape: tuple[int, ...], src_max: float,
                         arith: IntegerArithmetic, device: torch.device, what: str) -> SynPlan:
    """Precompute a synapse's float weights, pooling and exactness dtype."""
    bound = static_bound(syn.weight, src_max)
    dtype = exact_dtype(bound, what)
    s = pool_factor(syn, src_shape)
    w = torch.from_numpy(pooled_weight(syn, src_shape, s).astype(np.float64)).to(dtype)
    geometry = (syn.stride, syn.padding) if s == 1 else ((1, 1), (syn.padding[0] // s,
                                                                   syn.padding[1] // s))
    w = w.t().contiguous() if syn.kind is SynapseKind.DENSE else w.contiguous()
    return SynPlan(source=syn.source, kind=syn.kind, weight=w.to(device),
                   src_shape=tuple(src_shape), stride=tuple(geometry[0]),
                   padding=tuple(geometry[1]), dilation=tuple(syn.dilation),
                   groups=int(syn.groups), dtype=dtype, pool=s, weight_exp=int(syn.weight_exp),
                   bound=bound, limits=(arith.state_min, arith.state_max))


def membrane_dtype(layer: QLayer, syns: tuple[SynPlan, ...], bias: np.ndarray,
                   arith: IntegerArithmetic) -> torch.dtype:
    """float32 when the neuron update is provably exact in it (module docstring), else
    float64 (exact below 2**53)."""
    a_max = sum(s.out_bound for s in syns)
    b_max = float(np.abs(bias).max(initial=0))
    v_max = float(np.abs(layer.v_init.astype(np.float64)).max(initial=0))
    vth_max = float(np.abs(np.asarray(layer.vth, dtype=np.float64)).max(initial=0))
    lim = -arith.state_min
    if (a_max <= F32_EXACT and b_max < lim and v_max <= lim
            and (layer.readout or (0 < vth_max <= lim and np.all(layer.vth > 0)))):
        return torch.float32
    bound = max(v_max, lim) + math.ldexp(a_max, arith.target.act_shift) + b_max + vth_max
    return exact_dtype(bound, f"layer {layer.name} membrane")


def plan_integer_layer(layer: QLayer, shapes: Mapping[str, tuple[int, ...]],
                       arith: IntegerArithmetic, device: torch.device) -> LayerPlan:
    """Precompute a layer: synapse plans, effective bias, dynamics dtype."""
    payload = float(arith.target.payload_max)
    syns = tuple(plan_integer_synapse(s, shapes[s.source],
                                      payload if s.source == INPUT else 1.0, arith, device,
                                      f"layer {layer.name} <- {s.source}")
                 for s in layer.synapses)
    bias = layer.bias_mant.astype(np.float64) * 2.0 ** layer.bias_exp
    dtype = membrane_dtype(layer, syns, bias, arith)
    n, c = int(np.prod(layer.shape)), layer.shape[0]
    vth = np.broadcast_to(np.asarray(layer.vth, dtype=np.float64), (c,))
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype).to(device)  # noqa
    return LayerPlan(name=layer.name, shape=tuple(layer.shape), n=n, channels=c,
                     synapses=syns, schedule=as_tensor(bias).reshape(-1, c, 1), bias=None,
                     v_init=as_tensor(layer.v_init.astype(np.float64)),
                     vth=as_tensor(np.repeat(vth, n // c)), readout=layer.readout,
                     dtype=dtype, limits=(arith.state_min, arith.state_max),
                     shift=arith.shift, signed=layer.signed)


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


def linear_map(p: SynPlan, x: torch.Tensor) -> torch.Tensor:
    """``sum_i w_oi * x_i`` for rows of ``x`` (rows, *src_shape) in the synapse's dtype ->
    (rows, n_out). Float dense weights are (O, n_in) and multiply as ``x @ w.T``."""
    if p.pool > 1:
        x = sum_pool(x.reshape(-1, *p.src_shape), p.pool)
    if p.kind is SynapseKind.DENSE:
        w = p.weight if p.limits is not None else p.weight.T
        return x.reshape(x.shape[0], -1) @ w
    out = F.conv2d(x.reshape(-1, *p.src_shape) if p.pool == 1 else x, p.weight, None,
                   p.stride, p.padding, p.dilation, p.groups)
    return out.reshape(out.shape[0], -1)


def synapse_current(p: SynPlan, src: torch.Tensor) -> tuple[torch.Tensor, int]:
    """One synapse on rows of source outputs (rows, *src_shape) -> ((rows, n_out) current,
    number of outputs the integer synaptic clamp changed). Float: spikes (bool or 0/1) times
    the source threshold, or the analog input. Integer (``sims.reference.synapse_output``):
    clamp the sum to the state range, then the weight exponent."""
    if p.limits is None:
        return linear_map(p, _float_values(p, src)), 0
    acc, clamped = linear_map(p, src.to(p.dtype)), 0
    if p.clamps:
        lo, hi = p.limits
        clamped = int(((acc > hi) | (acc < lo)).sum())
        acc = acc.clamp_(lo, hi)
    if p.weight_exp == 0:
        return acc, clamped
    if p.weight_exp > 0:
        return acc.mul_(2.0 ** p.weight_exp), clamped
    return torch.floor_(acc.mul_(2.0 ** p.weight_exp)), clamped


def _float_values(p: SynPlan, src: torch.Tensor) -> torch.Tensor:
    """The values a float synapse multiplies: the input as is, spikes times theta (bool goes
    through uint8, whose conversion to float is several times faster; same values)."""
    if p.scale is None:
        return src
    x = src.view(torch.uint8).to(p.dtype) if src.dtype == torch.bool else src.to(p.dtype,
                                                                                copy=True)
    return x.reshape(-1, *p.src_shape).mul_(p.scale)


def summed_current(lp: LayerPlan, sources: Mapping[str, torch.Tensor], rows: int,
                   clamps: dict[str, int] | None = None, weight: int = 1
                   ) -> torch.Tensor | None:
    """Sum of a layer's synapse currents from the given sources (rows, n) in the layer's
    dtype, in synapse order (None if no synapse reads them); ``weight`` counts how often each
    clamp applies."""
    total = None
    for p in lp.synapses:
        if p.source in sources:
            cur, clamped = synapse_current(p, sources[p.source].reshape(-1, *p.src_shape))
            if clamps is not None:
                clamps[lp.name] += clamped * weight
            cur = cur.to(lp.dtype).reshape(rows, -1)
            total = cur if total is None else total.add_(cur)
    return total


def input_current(lp: LayerPlan, inputs: torch.Tensor, steps: int = 1,
                  clamps: dict[str, int] | None = None) -> torch.Tensor | None:
    """(B, n) current from the constant input: computed once, used at every step."""
    if lp.limits is None:  # float: the input synapses' currents summed as one stack
        parts = [synapse_current(p, inputs)[0] for p in lp.synapses if p.source == INPUT]
        return torch.stack(parts).sum(0).reshape(inputs.shape[0], -1) if parts else None
    return summed_current(lp, {INPUT: inputs}, inputs.shape[0], clamps, steps)


def spike_current(lp: LayerPlan, trains: Mapping[str, torch.Tensor], steps: int, batch: int,
                  clamps: dict[str, int] | None = None, t0: int = 0) -> torch.Tensor | None:
    """(steps, B, n) current from the upstream spikes of steps t0 .. t0 + steps - 1 (the
    trains' own first axis is time)."""
    chunk = {p.source: trains[p.source][t0:t0 + steps] for p in lp.synapses
             if p.source != INPUT and p.source in trains}
    total = summed_current(lp, chunk, steps * batch, clamps)
    return None if total is None else total.view(steps, batch, -1)


def float_chunk_steps(lp: LayerPlan, steps: int, batch: int) -> int:
    """Float path: steps per batched synapse call so that one call holds at most
    FLOAT_CHUNK_ELEMENTS values."""
    sizes = [int(np.prod(p.src_shape)) for p in lp.synapses]
    per_step = batch * max(sizes + [lp.n])
    return max(1, min(steps, FLOAT_CHUNK_ELEMENTS // max(per_step, 1)))


# --------------------------------------------------------------------------- the step

def count_ones(x: torch.Tensor) -> int:
    """Number of ones in a 0/1 float tensor: float32 row sums (exact, rows < 2**24 long),
    then a float64 sum of the rows (exact). Much faster than bool or float64 reductions."""
    return int(x.reshape(-1, x.shape[-1]).sum(dim=1).sum(dtype=torch.float64))


def clamp_state(lp: LayerPlan, v: torch.Tensor, scratch: torch.Tensor) -> int:
    """Clamp v in place to the state range; returns how many values it changed. ``aminmax``
    first (the clamp rarely binds) and only the violated side is counted."""
    lo_v, hi_v = torch.aminmax(v)
    lo, hi = lp.limits
    count = 0
    if hi_v > hi:
        count += count_ones(torch.gt(v, hi, out=scratch))
    if lo_v < lo:
        count += count_ones(torch.lt(v, lo, out=scratch))
    if count:
        v.clamp_(lo, hi)
    return count


def add_channel_bias(lp: LayerPlan, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """v (B, n) += bias per channel ((C,) or (C, 1)), in place."""
    v.view(v.shape[0], lp.channels, -1).add_(bias.view(lp.channels, 1))
    return v


def train_dtype(lp: LayerPlan, unsigned: torch.dtype) -> torch.dtype:
    """The dtype a layer's cached spike trains are kept in: ``unsigned`` (bool or uint8) for
    0/1 spikes, int8 for a signed layer's -1/0/1."""
    return torch.int8 if lp.signed else unsigned


def membrane(lp: LayerPlan, state: torch.Tensor) -> torch.Tensor:
    """The membrane v (B, n) of a layer's state (``initial_state``)."""
    return state[0] if lp.signed else state


def charge(lp: LayerPlan, state: torch.Tensor, drive: torch.Tensor) -> torch.Tensor:
    """v += drive, then the static bias (float: ``(v + I) + bias``), in place; returns v."""
    v = membrane(lp, state)
    v.add_(drive)
    return v if lp.bias is None else add_channel_bias(lp, v, lp.bias)


def settle(lp: LayerPlan, state: torch.Tensor, bias_t: torch.Tensor | None,
           out: torch.Tensor, scratch: torch.Tensor) -> int:
    """The rest of the step, in place: v += bias_t (per channel; None: already in the drive),
    clamp, then spikes ``v >= vth`` into ``out`` (0.0 / 1.0; signed: -1.0 too) and reset by
    subtraction (the readout: ``out = v``). Returns the clamp count. ``v - 1 * vth`` and
    ``v - 0 * vth = v`` are exactly ``torch.where(s, v - vth, v)``, several times faster."""
    v = membrane(lp, state)
    if bias_t is not None:
        add_channel_bias(lp, v, bias_t)
    saturated = clamp_state(lp, v, scratch) if lp.limits is not None else 0
    if lp.readout:
        out.copy_(v)
    else:
        v_, out_, vth = compare_views(lp, v, out)
        torch.ge(v_, vth, out=out_)
        if lp.signed:  # the -1 spikes, then the net count
            state[1].add_(out.sub_(taken_back(v, state[1], scratch)))
        v_.addcmul_(out_, vth, value=-1)
    return saturated


def taken_back(v: torch.Tensor, count: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """The signed neuron's -1 spikes as 0.0 / 1.0 in ``into``: ``(v < 0) & (count > 0)``
    (never where ``v >= vth``, as vth > 0)."""
    return torch.lt(v, 0, out=into).mul_(count > 0)


def channel_thresholds(lp: LayerPlan) -> torch.Tensor:
    """(C, 1) thresholds: every channel's neurons share one (``vth`` repeats it)."""
    return lp.vth.view(lp.channels, -1)[:, :1]


def compare_views(lp: LayerPlan, v: torch.Tensor, out: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v, out, vth) shaped for the compare: per channel (B, C, n/C) against (C, 1) for maps
    (~25 % faster on CPU than a per-neuron (n,) vector), flat for dense layers (where the
    per-channel view is the slower one)."""
    if lp.n == lp.channels:
        return v, out, lp.vth
    per_channel = (v.shape[0], lp.channels, -1)
    return v.view(per_channel), out.view(per_channel), channel_thresholds(lp)


def probe(lp: LayerPlan, state: torch.Tensor, bias_t: torch.Tensor, out: torch.Tensor,
          scratch: torch.Tensor) -> torch.Tensor:
    """The spikes ``settle`` would give with ``bias_t``, into ``out``; the state is not
    changed."""
    v = membrane(lp, state)
    per_channel = (v.shape[0], lp.channels, -1)
    torch.add(v.view(per_channel), bias_t.view(lp.channels, 1), out=out.view(per_channel))
    if lp.limits is not None:
        clamp_state(lp, out, scratch)
    back = taken_back(out, state[1], scratch) if lp.signed else None
    _, out_, vth = compare_views(lp, out, out)
    torch.ge(out_, vth, out=out_)
    return out if back is None else out.sub_(back)


def run_steps(lp: LayerPlan, drive: torch.Tensor, state: torch.Tensor, t0: int,
              out: torch.Tensor, scratch: torch.Tensor, biased: bool = False) -> int:
    """Steps t0 .. t0 + k - 1 (k = len(out)): ``drive`` is (k, B, n), or (B, n) the same at
    every step; ``biased``: the drive already holds the time bias. ``out`` (k, B, n) gets the
    spikes (readout: v); ``scratch`` is a (B, n) buffer. Returns the clamp count."""
    const, saturated = drive.dim() == 2, 0
    for t in range(out.shape[0]):
        charge(lp, state, drive if const else drive[t])
        saturated += settle(lp, state, None if biased else lp.schedule[t0 + t], out[t],
                            scratch)
    return saturated


def bias_sweep(lp: LayerPlan, drives: Iterable[torch.Tensor], state: torch.Tensor,
               bias_of: Callable[[int], torch.Tensor],
               update: Callable[[int, torch.Tensor], None]) -> None:
    """FTBC's step over t = 0, 1, ..: charge with ``drives[t]``, probe the spikes with the
    current ``bias_of(t)``, ``update(t, spikes)`` moves the bias, then the step is settled
    (re-fired) with the moved ``bias_of(t)``."""
    v = membrane(lp, state)
    spikes, scratch = torch.empty_like(v), torch.empty_like(v)
    for t, drive in enumerate(drives):
        charge(lp, state, drive)
        update(t, probe(lp, state, bias_of(t), spikes, scratch))
        settle(lp, state, bias_of(t), spikes, scratch)


def bias_solve(lp: LayerPlan, drives: Sequence[Iterable[torch.Tensor]],
               bias_of: Callable[[torch.Tensor], torch.Tensor],
               rate_of: Callable[[torch.Tensor], torch.Tensor],
               solve: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor],
               scale: torch.Tensor | None = None) -> None:
    """FTBC's step solved over several batches at once (``bias_sweep`` is the sweeps'): per
    t = 0, 1, .. every batch charges with its next drive (``drives``: one stream per batch),
    ``solve(t, rate)`` returns step t's candidate, then every batch settles step t with
    ``bias_of(candidate)``. ``rate(c)`` is ``scale`` times the batches' mean of
    ``rate_of(spikes)`` (C,), the spikes (B, C, n / C) that ``probe`` gives with
    ``bias_of(c)``; the states are not changed by it. Holds every batch's state at once."""
    states: list[torch.Tensor] = []
    buffers = torch.empty(0)

    def rate(candidate: torch.Tensor) -> torch.Tensor:
        bias, total = bias_of(candidate), 0
        for state in states:
            rows = membrane(lp, state).shape[0]
            fired = probe(lp, state, bias, buffers[0, :rows], buffers[1, :rows])
            total = total + rate_of(fired.view(rows, lp.channels, -1))
        return (total if scale is None else scale * total) / len(states)

    for t, step in enumerate(zip(*drives)):
        if not states:  # the batch sizes, from the first step's drives
            states = [initial_state(lp, drive.shape[-2]) for drive in step]
            v = membrane(lp, states[0])
            widest = max(drive.shape[-2] for drive in step)
            buffers = torch.empty((2, widest, lp.n), dtype=v.dtype, device=v.device)
        for state, drive in zip(states, step):
            charge(lp, state, drive)
        bias = bias_of(solve(t, rate))
        for state in states:
            rows = membrane(lp, state).shape[0]
            settle(lp, state, bias, buffers[0, :rows], buffers[1, :rows])


def initial_state(lp: LayerPlan, batch: int) -> torch.Tensor:
    """The state at t = 0: the (B, n) membrane, v_init per channel repeated over positions;
    for a signed layer (2, B, n), the membrane and a zero net spike count."""
    v = lp.v_init.repeat_interleave(lp.n // lp.channels).expand(batch, lp.n)
    if lp.signed:
        return torch.stack((v, torch.zeros_like(v)))
    return v.clone()
