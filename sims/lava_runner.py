"""Run an exported FTBC network in Lava's CPU simulation (``Loihi2SimCfg``, ``fixed_pt``).

The process graph is built from the exported FILE (through ``exporters.netx.read_netx``), so
what is verified is what is deployed:

    RingBuffer (graded x_int, the whole N x period stream)
      -> Dense (sign_mode MIXED, 8 weight bits, num_message_bits 8 from the input, 0 from
         spikes) or Conv (Lava's (W, H, C) layout through reshape/transpose virtual ports)
      -> IFBiasSchedule neurons (several synapses into one InPort are summed by Lava)

Timing: each synaptic hop adds one step, so layer l (``QLayer.depth`` hops deep) sees its
step-t input at local step delay + t; a sample occupies ``period = T + D`` steps (D the
deepest delay) and the next one follows immediately. The neurons window themselves (see
``sims.lava_procs.process``); the input sends x_int at local steps 1..T and zeros after.

Lava has no way here to delay one synaptic path against another, so a layer whose sources
sit at different depths (a residual skip over layers) is refused with ``InputError``; so is a
conv synapse with weight_exp != 0 (Lava's fixed-point Conv ignores weight_exp).

Lava facts this relies on (lava-nc 0.10.0): Dense's fixed-point model re-clips/truncates its
weights (hence sign_mode MIXED explicitly: an all-negative matrix would otherwise be inferred
INHIBITORY and -256 clipped to -255) and applies weight_exp as a floor shift; Conv's
fixed-point model computes with scipy ``convolve2d`` in float64 (torch is disabled inside
Lava processes), exact for our integers, then clamps to 24 bits, the reference's clamp; it
is also the slow part (one 2-D convolution per (out, in) channel pair per step).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable

import numpy as np

from core.errors import InputError
from core.ir import INPUT, QLayer, QSynapse, QuantGraph, SynapseKind
from exporters.netx import PAYLOAD_BITS, read_netx
from sims.progress import progress_bar


@dataclass(frozen=True)
class LavaResult:
    """Lava's output, aligned to the emulator's steps: ``spikes`` layer -> (T, N, n) uint8
    (spiking layers, flat C order), ``readout`` (T, N, K) int64 (the readout's v after each
    step), ``seconds`` wall time (build + run + read back)."""
    spikes: dict[str, np.ndarray]
    readout: np.ndarray
    seconds: float


def period_of(q: QuantGraph) -> int:
    """Steps per sample: T plus the deepest layer's depth (one step per hop)."""
    return q.timesteps + max(layer.depth for layer in q.layers)


def lava_problems(q: QuantGraph) -> list[str]:
    """What in ``q`` this Lava simulation cannot run exactly, one line each."""
    depth = {INPUT: 0}
    problems = []
    for layer in q.layers:
        src_delays = sorted({depth[s.source] for s in layer.synapses})
        if len(src_delays) > 1:
            problems.append(f"layer {layer.name}: its sources sit at different depths "
                            f"{src_delays}; Lava would need synaptic delays to align them")
        elif layer.depth != src_delays[0] + 1:
            problems.append(f"layer {layer.name}: depth {layer.depth} but Lava delivers its "
                            f"input {src_delays[0] + 1} steps after the sample starts")
        problems += [f"layer {layer.name}: conv weight_exp {s.weight_exp} != 0 (Lava's "
                     f"fixed-point Conv ignores weight_exp)"
                     for s in layer.synapses if s.kind == "conv" and s.weight_exp != 0]
        depth[layer.name] = layer.depth
    return problems


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
    problems = lava_problems(q)
    if problems:
        raise InputError(f"{net_path}: cannot run in Lava: {problems[0]}")
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
    lo, hi = -(1 << (PAYLOAD_BITS - 1)), (1 << (PAYLOAD_BITS - 1)) - 1
    if x.ndim != 1 + len(q.input.shape) or tuple(x.shape[1:]) != tuple(q.input.shape):
        raise InputError(f"x_int has shape {x.shape}, expected (N, {q.input.shape})")
    if x.shape[0] < 1 or x.dtype.kind not in "iu":
        raise InputError(f"x_int must be a non-empty integer array, got {x.dtype} {x.shape}")
    if x.min() < lo or x.max() > hi:
        raise InputError(f"x_int outside the {PAYLOAD_BITS}-bit graded payload [{lo}, {hi}]")
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
    neurons = {}
    for layer in q.layers:
        neuron = _neuron(q, layer, x_int.shape[0], period)
        for syn in layer.synapses:
            src_port, src_shape = ports[syn.source]
            _synapse(syn, src_port, src_shape, layer, graded=syn.source == INPUT,
                     sink=neuron.a_in)
        ports[layer.name] = (neuron.s_out, tuple(layer.shape))
        neurons[layer.name] = neuron
    return source, neurons


def _neuron(q: QuantGraph, layer: QLayer, num: int, period: int):
    from sims.lava_procs.process import IFBiasSchedule
    n = int(np.prod(layer.shape))
    per_channel = n // layer.shape[0]
    return IFBiasSchedule(
        n=n, vth=np.repeat(np.broadcast_to(layer.vth, layer.shape[:1]), per_channel),
        bias=np.repeat(layer.bias_mant.astype(np.int64), per_channel, 1),
        bias_exp=layer.bias_exp, v_init=np.repeat(layer.v_init.astype(np.int64), per_channel),
        delay=layer.depth, timesteps=q.timesteps, period=period, num_samples=num,
        readout=layer.readout, name=layer.name)


def _synapse(syn: QSynapse, src_port, src_shape: tuple[int, ...], layer: QLayer,
             graded: bool, sink) -> None:
    """One Lava connection process between a flat C-order source port and the neuron."""
    bits = PAYLOAD_BITS if graded else 0
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
            words = neurons[layer.name].spike_rec.get().astype(np.int64)
            spikes[layer.name] = unpack_spikes(words, n).reshape(
                num, q.timesteps, n).transpose(1, 0, 2).copy()
    return spikes, readout


def unpack_spikes(words: np.ndarray, n: int) -> np.ndarray:
    """(rows, W) packed int64 words -> (rows, n) uint8 (inverse of ``pack_spikes``)."""
    from sims.lava_procs.process import PACK_BITS
    shifts = np.arange(PACK_BITS, dtype=np.int64)
    bits = (words[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :n].astype(np.uint8)
