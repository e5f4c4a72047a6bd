"""Integer reference for the deployed neuron arithmetic: the living specification.

Plain numpy, one sample at a time, no vectorisation tricks. The fast emulator
(``sims.emulator``) and the Lava process models (``sims.lava_procs``) must compute exactly
this; tests compare them with ``assert_array_equal``.

Input encoding (``QInput``)
    x' = (x - mean) / std (when the model has an input transform), then
    ``x_int = clip(round_half_even(x' * 2**scale_exp), -2**(P-1), 2**(P-1) - 1)`` with P the
    graded-spike payload width; sent as a graded spike at every step t = 1..T.

Synapse (``QSynapse``), per step, on the source's output ``src`` (x_int, or spikes 0/1)::

    acc = sum_i w[o, i] * src[i]             (dense on the flattened source, or conv2d)
    acc = clamp(acc, -2**23, 2**23 - 1)      (Lava's Conv clamps its 24-bit output; the
                                             quantizer's validate() proves it never binds)
    a   = acc << weight_exp  if weight_exp >= 0 else  acc >> -weight_exp   (floor)

Neuron (``QLayer``), per step t = 1..T, channel c, with a[t] the sum over its synapses::

    v  = v + (a[t] << 6) + (bias_mant[t-1, c] << bias_exp)     (int64 intermediate)
    v  = clamp(v, -2**23, 2**23 - 1)          (24-bit state, saturating)
    s  = 1 if v >= vth[c] else 0              (">=": the paper's compare, not Lava LIF's ">")
    v  = v - s * vth[c]                       (reset by subtraction; vth is per channel)
    v starts at v_init[c] before t = 1.

The signed neuron (``QLayer.signed``, opt-in) keeps a second state, its net spike count
``n`` (0 before t = 1), and may also send -1 to take back a spike it sent too early::

    s  = 1 if v >= vth[c] else (-1 if v < 0 and n > 0 else 0)
    v  = v - s * vth[c];  n = n + s

so its net output never goes below 0 (the ReLU's floor). Its spikes are signed graded
payloads (-1 / +1): a synapse from it computes ``sum_i w[o, i] * s[i]`` as for x_int.

The ``<< 6`` is Loihi's convention (synaptic input enters the state with 6 fractional bits),
so the bias has 1/64 of a weight unit resolution. A readout layer has no compare and no reset;
its output after step t is v. Layers are evaluated in topological order; a layer's step t
sees its sources' step-t outputs (no delay: Lava's one-step synaptic delay per hop is an
offset of ``QLayer.depth`` steps, and a residual input's shorter path is held back by a
synaptic delay to match, both applied only when running on Lava; ``hw_targets.timing``).
"""
from __future__ import annotations

import numpy as np

from core.ir import INPUT, QInput, QLayer, QSynapse, QuantGraph, SynapseKind

STATE_BITS = 24
STATE_MIN, STATE_MAX = -(1 << (STATE_BITS - 1)), (1 << (STATE_BITS - 1)) - 1
ACT_SHIFT = 6  # synaptic input enters the membrane shifted left by 6 (Lava's act_shift)


def _scaled_input(qin: QInput, x: np.ndarray, payload_bits: int
                  ) -> tuple[np.ndarray, int, int]:
    """(round(x' * 2**scale_exp) before clipping, payload min, payload max)."""
    xf = np.asarray(x, dtype=np.float64)
    if qin.mean is not None:
        chan = (-1,) + (1,) * (len(qin.shape) - 1)
        xf = (xf - qin.mean.reshape(chan)) / qin.std.reshape(chan)
    lo, hi = -(1 << (payload_bits - 1)), (1 << (payload_bits - 1)) - 1
    return np.rint(xf * 2.0 ** qin.scale_exp), lo, hi


def encode_input(qin: QInput, x: np.ndarray, payload_bits: int = 8) -> np.ndarray:
    """Float samples (N, *shape) -> int64 graded-spike payloads, as specified above."""
    raw, lo, hi = _scaled_input(qin, x, payload_bits)
    return np.clip(raw, lo, hi).astype(np.int64)


def clipped_inputs(qin: QInput, x: np.ndarray, payload_bits: int = 8) -> int:
    """How many input values ``encode_input`` clips to the payload range (data outside the
    range the encoding was chosen for)."""
    raw, lo, hi = _scaled_input(qin, x, payload_bits)
    return int(np.count_nonzero((raw < lo) | (raw > hi)))


def _conv2d_int(src: np.ndarray, syn: QSynapse) -> np.ndarray:
    """Exact integer 2-D convolution (cross-correlation, as torch) of one (C, H, W) input."""
    w = syn.weight.astype(np.int64)
    out_c, in_per_group, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = syn.stride, syn.padding, syn.dilation
    c, h, wd = src.shape
    padded = np.zeros((c, h + 2 * ph, wd + 2 * pw), dtype=np.int64)
    padded[:, ph:ph + h, pw:pw + wd] = src
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((out_c, oh, ow), dtype=np.int64)
    out_per_group = out_c // syn.groups
    for o in range(out_c):
        g = o // out_per_group
        for i in range(in_per_group):
            ch = g * in_per_group + i
            for u in range(kh):
                for v in range(kw):
                    rows = padded[ch, u * dh: u * dh + sh * (oh - 1) + 1: sh,
                                  v * dw: v * dw + sw * (ow - 1) + 1: sw]
                    out[o] += w[o, i, u, v] * rows
    return out


def synapse_output(syn: QSynapse, src: np.ndarray) -> np.ndarray:
    """One step of one synapse: integer input current (flattened) from a source output."""
    if syn.kind is SynapseKind.DENSE:
        acc = syn.weight.astype(np.int64) @ src.reshape(-1).astype(np.int64)
    else:
        acc = _conv2d_int(src.astype(np.int64), syn).reshape(-1)
    acc = np.clip(acc, STATE_MIN, STATE_MAX)
    if syn.weight_exp >= 0:
        return acc << syn.weight_exp
    return acc >> -syn.weight_exp


def run_layer(layer: QLayer, currents: np.ndarray) -> np.ndarray:
    """Neuron dynamics over T steps. ``currents`` (T, n) int64 -> spikes (T, n) int64 (0 / 1,
    or -1 / 0 / 1 for a signed layer), or the membrane v after each step for the readout."""
    steps, n = currents.shape
    per_channel = n // layer.shape[0]
    v = np.repeat(layer.v_init.astype(np.int64), per_channel)
    vth = np.repeat(np.broadcast_to(np.asarray(layer.vth, dtype=np.int64), layer.shape[:1]),
                    per_channel)
    out = np.zeros((steps, n), dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    for t in range(steps):
        bias = np.repeat(layer.bias_mant[t].astype(np.int64) << layer.bias_exp, per_channel)
        v = np.clip(v + (currents[t] << ACT_SHIFT) + bias, STATE_MIN, STATE_MAX)
        if layer.readout:
            out[t] = v
            continue
        spikes = (v >= vth).astype(np.int64)
        if layer.signed:
            spikes -= (v < 0) & (count > 0)
            count += spikes
        v = v - spikes * vth
        out[t] = spikes
    return out


def reference_run(q: QuantGraph, x_int: np.ndarray) -> dict[str, np.ndarray]:
    """Run one encoded sample (``encode_input`` output, shape ``q.input.shape``).

    Returns, per layer name, (T, n) int64: spikes for spiking layers, the accumulated membrane
    for the readout (flattened in C order)."""
    outputs: dict[str, np.ndarray] = {}
    for layer in q.layers:
        n = int(np.prod(layer.shape))
        currents = np.zeros((q.timesteps, n), dtype=np.int64)
        for syn in layer.synapses:
            for t in range(q.timesteps):
                src = (x_int if syn.source == INPUT
                       else outputs[syn.source][t].reshape(q.layer(syn.source).shape))
                currents[t] += synapse_output(syn, src)
        outputs[layer.name] = run_layer(layer, currents)
    return outputs
