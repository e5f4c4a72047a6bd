"""Run an exported FTBC network in Lava's CPU simulation (``Loihi2SimCfg``, ``fixed_pt``).

The process graph is built from the exported FILE (through ``exporters.netx.read_netx``), so
what is verified is what is deployed:

    RingBuffer (graded x_int, the whole N x period stream)
      -> Dense (sign_mode MIXED, 8 weight bits, num_message_bits 8 from the input, 0 from
         an IF layer's spikes, 2 from a signed layer's -1/0/+1: ``message_bits``) or Conv
         (Lava's (W, H, C) layout through reshape/transpose virtual ports),
         or Sparse for a conv with a small output plane (``runs_sparse``), or, for a
         synapse with a synaptic delay, DelaySparse (below)
      -> IFBiasSchedule neurons (several synapses into one InPort are summed by Lava;
         ``SignedIFBiasSchedule`` for a signed layer)

Signed layers (``QLayer.signed``): their spikes are graded payloads -1 / 0 / +1 (int8), so
every synapse reading one runs with ``num_message_bits`` > 0, where Lava's bit-accurate
Dense, Sparse and DelaySparse compute ``weights @ s`` and Conv convolves s as it does the
graded input: exactly the reference's ``sum_i w[o, i] * s[i]`` (with 0 message bits they
would cast s to bool and read -1 as +1).

Timing (``hw_targets.timing``): each synaptic hop adds one step, so layer l
(``QLayer.depth`` hops deep) sees its step-t input at local step depth + t; a sample
occupies ``period = T + D`` steps (D the deepest depth) and the next one follows
immediately. The neurons window themselves (see ``sims.lava_procs.process``); the input
sends x_int at local steps 1..T and zeros after.

Residual inputs: a synapse from a source shallower than the layer's longest input path
holds its spikes ``delay = depth(layer) - 1 - depth(source)`` extra steps, so every input of
the layer's step t arrives at local step depth + t. Such a synapse runs as lava-nc's
bit-accurate ``DelaySparse`` (Loihi 2's per-synapse 6-bit delay; lava.proc.sparse.models
PyDelaySparseModelBitAcc) with every connection's delay set to ``delay``: a dense synapse
with its weight matrix, a conv synapse with its exact sparse connection matrix
(``conv_matrix``; Lava's Conv has no delays). The graph is checked first by the target's one
``validate`` (``exporters.quantize.validate`` for ``loihi2-sim``: depths, delays within
0..63, weights, a conv's weight_exp 0 since Lava's Conv ignores it, ...).

Lava facts this relies on (lava-nc 0.10.0): Dense's (and Sparse's) fixed-point model
re-clips/truncates its weights (hence sign_mode MIXED explicitly: an all-negative matrix
would otherwise be inferred INHIBITORY and -256 clipped to -255) and applies weight_exp as
a floor shift; Conv's fixed-point model computes with scipy ``convolve2d`` in float64
(torch is disabled inside Lava processes), exact for our integers, then clamps to 24 bits,
the reference's clamp; it is also the slow part (one 2-D convolution per (out, in) channel
pair per step), hence Sparse where the plane is small and the channel pairs many.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import numpy as np

from core.errors import HardwareLimitError, InputError, Violation
from core.ir import INPUT, QLayer, QSynapse, QuantGraph, SynapseKind
from exporters.netx import read_netx
from exporters.quantize import validate
from hw_targets import get_target
from hw_targets.timing import synaptic_delays
from sims.progress import progress_bar

# What Lava's CPU simulation runs exactly is the simulated target's envelope.
LAVA_TARGET = "loihi2-sim"
CONV_MATRIX_BLOCK = 1 << 22  # candidate taps per block of output channels (conv_matrix)
SPARSE_CONV_MAX_PIXELS = 16  # convs with output planes up to 4 x 4 run as Sparse (runs_sparse)


@dataclass(frozen=True)
class LavaResult:
    """Lava's output, aligned to the emulator's steps: ``spikes`` layer -> (T, N, n) uint8
    0/1 (spiking layers, flat C order; int8 -1/0/1 for a signed layer), ``readout``
    (T, N, K) int64 (the readout's v after each step), ``seconds`` wall time (build + run +
    read back)."""
    spikes: dict[str, np.ndarray]
    readout: np.ndarray
    seconds: float


def period_of(q: QuantGraph) -> int:
    """Steps per sample: T plus the deepest layer's depth (one step per hop)."""
    return q.timesteps + max(layer.depth for layer in q.layers)


def lava_problems(q: QuantGraph) -> list[Violation]:
    """What in ``q`` Lava's simulation cannot run exactly: the violations of the simulated
    target's limits (``exporters.quantize.validate``, the one check; ``run_lava`` refuses a
    network with any)."""
    return validate(q, get_target(LAVA_TARGET))


def run_lava(net_path: str, x_int: np.ndarray, *, progress: bool = False,
             select_tag: str = "fixed_pt", on_sample: Callable[[int], None] | None = None,
             guard: Callable[[], ContextManager] = contextlib.nullcontext) -> LavaResult:
    """Simulate every sample of ``x_int`` (N, *input_shape) int64 through the network in
    ``net_path``; records are read back once per layer at the end. ``select_tag``
    "floating_pt" runs Lava's float models instead (not bit-exact when weight_exp != 0).

    ``on_sample(k)`` is called after sample k ran (the samples then run one by one);
    ``guard()`` wraps the span in which Lava's runtime processes must stay alive (from
    the first step to the last read-back; ``sims.lava_pool`` watches them there)."""
    start = time.perf_counter()
    q = read_netx(net_path)
    violations = lava_problems(q)
    if violations:
        raise HardwareLimitError(f"{LAVA_TARGET} (Lava cannot run {net_path} exactly)",
                                 violations)
    x_int = _check_input(q, x_int)
    num, period = x_int.shape[0], period_of(q)
    source, neurons = _build(q, x_int, period)
    try:
        with guard():
            _run(source, num, period, progress, select_tag, on_sample)
            spikes, readout = _collect(q, neurons, num)
    finally:
        source.stop()
    return LavaResult(spikes=spikes, readout=readout, seconds=time.perf_counter() - start)


def _check_input(q: QuantGraph, x_int: np.ndarray) -> np.ndarray:
    x = np.asarray(x_int)
    bits = get_target(q.target).input_payload_bits
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if x.ndim != 1 + len(q.input.shape) or tuple(x.shape[1:]) != tuple(q.input.shape):
        raise InputError(f"x_int has shape {x.shape}, expected (N, {q.input.shape})")
    if x.shape[0] < 1 or x.dtype.kind not in "iu":
        raise InputError(f"x_int must be a non-empty integer array, got {x.dtype} {x.shape}")
    if x.min() < lo or x.max() > hi:
        raise InputError(f"x_int outside the {bits}-bit graded payload [{lo}, {hi}]")
    return x.astype(np.int64)


# --------------------------------------------------------------------------- graph

def input_stream(x_int: np.ndarray, timesteps: int, period: int) -> np.ndarray:
    """(n_in, N * period): sample k's x_int at columns k*period + 0..T-1, zeros elsewhere."""
    num = x_int.shape[0]
    flat = x_int.reshape(num, -1)
    stream = np.zeros((num, period, flat.shape[1]), dtype=np.int64)
    stream[:, :timesteps] = flat[:, None, :]
    return stream.reshape(num * period, -1).T.copy()


def import_lava() -> None:
    """Import Lava's runtime even when the multiprocessing start method is already fixed.

    Lava's message infrastructure calls ``multiprocessing.set_start_method('fork')`` at import
    and raises RuntimeError('context has already been set') if anything fixed it before (a
    tqdm progress bar does, via its multiprocessing lock). Lava's CPU runtime needs fork, so
    the start method is released and Lava sets it to 'fork' (Linux's default anyway)."""
    import multiprocessing
    import sys
    if "lava.magma.runtime.message_infrastructure.multiprocessing" in sys.modules:
        return
    if multiprocessing.get_start_method(allow_none=True) is not None:
        multiprocessing.set_start_method(None, force=True)
    import lava.magma.runtime.message_infrastructure.multiprocessing  # noqa: F401


def _build(q: QuantGraph, x_int: np.ndarray, period: int):
    import_lava()
    from lava.proc.io.source import RingBuffer
    source = RingBuffer(data=input_stream(x_int, q.timesteps, period))
    ports = {INPUT: (source.s_out, tuple(q.input.shape))}
    neurons, delays = {}, synaptic_delays(q.layers)
    for layer in q.layers:
        neuron = _neuron(q, layer, x_int.shape[0], period)
        for syn, delay in zip(layer.synapses, delays[layer.name]):
            src_port, src_shape = ports[syn.source]
            bits = message_bits(q, syn.source)
            if delay or runs_sparse(syn, layer):
                _sparse_synapse(syn, delay, src_port, src_shape, layer, bits,
                                sink=neuron.a_in)
            else:
                _synapse(syn, src_port, src_shape, layer, bits, sink=neuron.a_in)
        ports[layer.name] = (neuron.s_out, tuple(layer.shape))
        neurons[layer.name] = neuron
    return source, neurons


def message_bits(q: QuantGraph, source: str) -> int:
    """The ``num_message_bits`` of a synapse reading ``source`` (``Target.message_bits``:
    the graded-input payload width from the input, 2 from a signed layer's -1/0/+1, 0 =
    binary spikes from an IF layer)."""
    return get_target(q.target).message_bits(None if source == INPUT else q.layer(source).signed)


def _neuron(q: QuantGraph, layer: QLayer, num: int, period: int):
    from sims.lava_procs.process import IFBiasSchedule
    target = get_target(q.target)
    n = int(np.prod(layer.shape))
    per_channel = n // layer.shape[0]
    return IFBiasSchedule(
        n=n, vth=np.repeat(np.broadcast_to(layer.vth, layer.shape[:1]), per_channel),
        bias=np.repeat(layer.bias_mant.astype(np.int64), per_channel, 1),
        bias_exp=layer.bias_exp, act_shift=target.act_shift, state_bits=target.state_bits,
        v_init=np.repeat(layer.v_init.astype(np.int64), per_channel),
        depth=layer.depth, timesteps=q.timesteps, period=period, num_samples=num,
        readout=layer.readout, signed=layer.signed, name=layer.name)


def _synapse(syn: QSynapse, src_port, src_shape: tuple[int, ...], layer: QLayer,
             bits: int, sink) -> None:
    """One Lava connection process between a flat C-order source port and the neuron
    (``bits``: message bits, ``message_bits``; > 0 makes Lava multiply by the payload)."""
    if syn.kind is SynapseKind.DENSE:
        from lava.proc.dense.process import Dense
        from lava.utils.weightutils import SignMode
        conn = Dense(weights=syn.weight.astype(np.int32), weight_exp=int(syn.weight_exp),
                     num_weight_bits=8, sign_mode=SignMode.MIXED, num_message_bits=bits)
        src_port.connect(conn.s_in)
        conn.a_out.connect(sink)
        return
    from lava.proc.conv.process import Conv
    conn = Conv(weight=lava_conv_weight(syn.weight), input_shape=_whc(src_shape),
                stride=tuple(syn.stride[::-1]), padding=tuple(syn.padding[::-1]),
                dilation=tuple(syn.dilation[::-1]), groups=int(syn.groups),
                num_weight_bits=8, num_message_bits=bits)
    src_port.reshape(tuple(src_shape)).transpose([2, 1, 0]).connect(conn.s_in)
    conn.a_out.transpose([2, 1, 0]).reshape((int(np.prod(layer.shape)),)).connect(sink)


def runs_sparse(syn: QSynapse, layer: QLayer) -> bool:
    """Whether an undelayed conv synapse runs as its sparse matrix instead of Lava's Conv:
    when the output plane has at most ``SPARSE_CONV_MAX_PIXELS`` pixels. Lava's Conv makes
    one scipy ``convolve2d`` call per (out, in) channel pair and step, so deep layers with
    many channels on a small plane (VGG-16's 512 x 512 channels at 4 x 4 and 2 x 2: 262k
    calls per step each) cost far more than their few synapses; large planes keep Conv,
    whose memory does not grow with the plane (bench/README.md, "Lava: Conv or Sparse")."""
    return (syn.kind is SynapseKind.CONV
            and int(np.prod(layer.shape[1:])) <= SPARSE_CONV_MAX_PIXELS)


def _sparse_synapse(syn: QSynapse, delay: int, src_port, src_shape: tuple[int, ...],
                    layer: QLayer, bits: int, sink) -> None:
    """A synapse as its exact connection matrix (flat C order on both sides): Lava's
    bit-accurate Sparse, or with ``delay`` > 0 DelaySparse with every connection's delay set
    to ``delay`` (Lava: delay k arrives k + 1 steps later). Sparse and DelaySparse apply
    weight_exp and do not clamp; the reference's 24-bit clamp never binds (validate)."""
    from lava.proc.sparse.process import DelaySparse, Sparse
    from lava.utils.weightutils import SignMode
    from scipy.sparse import csr_matrix
    weights = (csr_matrix(np.asarray(syn.weight, dtype=np.int32))
               if syn.kind is SynapseKind.DENSE
               else conv_matrix(syn, src_shape, tuple(layer.shape)))
    common = dict(weight_exp=int(syn.weight_exp), num_weight_bits=8,
                  sign_mode=SignMode.MIXED, num_message_bits=bits)
    if delay:
        delays = weights.copy()
        delays.data = np.full(delays.data.shape, delay, dtype=int)
        conn = DelaySparse(weights=weights, delays=delays, max_delay=int(delay), **common)
    else:
        conn = Sparse(weights=weights, **common)
    src_port.connect(conn.s_in)
    conn.a_out.connect(sink)


def conv_matrix(syn: QSynapse, src: tuple[int, ...], out: tuple[int, ...]):
    """The (O*OH*OW, C*H*W) scipy CSR matrix (int32) of a conv synapse over flat C-order
    source and output: row (o, y, x) holds w[o, c - g*I, i, j] at column (c, y*s - p + i*d,
    x*s - p + j*d) for every in-range tap (taps on padding connect to nothing), zero weights
    left out. Exactly the cross-correlation the reference computes. Built over blocks of
    output channels (at most ``CONV_MATRIX_BLOCK`` candidate taps each), so the index
    arrays stay small beside the matrix itself."""
    from scipy.sparse import csr_matrix, vstack
    w = np.asarray(syn.weight, dtype=np.int64)
    o_n, i_n, kh, kw = w.shape
    (c_n, h, wd), (_, oh, ow) = src, out
    per_group = o_n // syn.groups
    step = max(1, CONV_MATRIX_BLOCK // (i_n * kh * kw * oh * ow))
    blocks = []
    for o0 in range(0, o_n, step):
        o1 = min(o0 + step, o_n)
        o, c, i, j, y, x = np.meshgrid(np.arange(o0, o1), np.arange(i_n), np.arange(kh),
                                       np.arange(kw), np.arange(oh), np.arange(ow),
                                       indexing="ij", sparse=True)
        iy = y * syn.stride[0] - syn.padding[0] + i * syn.dilation[0]
        ix = x * syn.stride[1] - syn.padding[1] + j * syn.dilation[1]
        value = w[o, c, i, j]
        keep = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < wd) & (value != 0)
        rows = np.broadcast_to(((o - o0) * oh + y) * ow + x, keep.shape)[keep]
        cols = np.broadcast_to((((o // per_group) * i_n + c) * h + iy) * wd + ix,
                               keep.shape)[keep]
        blocks.append(csr_matrix(
            (np.broadcast_to(value, keep.shape)[keep].astype(np.int32), (rows, cols)),
            shape=((o1 - o0) * oh * ow, c_n * h * wd)))
    return blocks[0] if len(blocks) == 1 else vstack(blocks, format="csr")


def lava_conv_weight(weight: np.ndarray) -> np.ndarray:
    """torch (O, I, kH, kW) cross-correlation kernel -> Lava Conv (O, kW, kH, I) kernel.

    Lava's Conv convolves (it flips both kernel axes before calling torch's correlation) and
    works in (W, H, C), so the kernel is transposed and flipped in both spatial axes."""
    return np.ascontiguousarray(weight.transpose(0, 3, 2, 1)[:, ::-1, ::-1]).astype(np.int32)


def _whc(shape: Iterable[int]) -> tuple[int, int, int]:
    c, h, w = shape
    return (w, h, c)


# --------------------------------------------------------------------------- run + read

def _run(source, num: int, period: int, progress: bool, select_tag: str,
         on_sample: Callable[[int], None] | None) -> None:
    from lava.magma.core.run_conditions import RunSteps
    from lava.magma.core.run_configs import Loihi2SimCfg
    cfg = Loihi2SimCfg(select_tag=select_tag)
    if not progress and on_sample is None:
        source.run(condition=RunSteps(num_steps=num * period), run_cfg=cfg)
        return
    with progress_bar(num, "lava", progress, leave=True) as bar:
        for k in range(num):
            source.run(condition=RunSteps(num_steps=period), run_cfg=cfg)
            bar.update(1)
            if on_sample is not None:
                on_sample(k)


def _collect(q: QuantGraph, neurons: dict, num: int) -> tuple[dict[str, np.ndarray],
                                                              np.ndarray]:
    spikes, readout = {}, np.zeros((q.timesteps, num, 0), dtype=np.int64)
    for layer in q.layers:
        n = int(np.prod(layer.shape))
        if layer.readout:
            v = neurons[layer.name].v_rec.get().astype(np.int64)
            readout = v.reshape(num, q.timesteps, n).transpose(1, 0, 2).copy()
        else:
            spikes[layer.name] = _recorded_spikes(layer, neurons[layer.name], n).reshape(
                num, q.timesteps, n).transpose(1, 0, 2).copy()
    return spikes, readout


def _recorded_spikes(layer: QLayer, neuron, n: int) -> np.ndarray:
    """(N*T, n) spikes of one layer from its records: uint8 0/1, or for a signed layer
    int8 ``+1 spikes - (-1 spikes)`` (``spike_rec`` minus ``neg_rec``)."""
    plus = unpack_spikes(neuron.spike_rec.get().astype(np.int64), n)
    if not layer.signed:
        return plus
    minus = unpack_spikes(neuron.neg_rec.get().astype(np.int64), n)
    return plus.astype(np.int8) - minus.astype(np.int8)


def unpack_spikes(words: np.ndarray, n: int) -> np.ndarray:
    """(rows, W) packed int64 words -> (rows, n) uint8 (inverse of ``pack_spikes``)."""
    from sims.lava_procs.process import PACK_BITS
    shifts = np.arange(PACK_BITS, dtype=np.int64)
    bits = (words[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :n].astype(np.uint8)
