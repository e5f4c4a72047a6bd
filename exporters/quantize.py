"""Quantize a normalised ``SnnGraph`` into the integer ``QuantGraph`` of a hardware target.

No torch here (exporters never import torch). Deterministic: numpy ``rint`` (round half to
even) everywhere, no randomness, so the same graph gives identical integers.

Scheme (integer semantics: ``sims/reference.py``; limits: ``hw_targets/base.py``)
----------------------------------------------------------------------------------
Input: graded spikes ``x_int = rint(x' * 2**k)``, ``x' = (x - mean) / std``; ``k`` is the
largest integer with ``max|x'| * 2**k <= 127`` over the data range (``[0, 1]`` by
convention), so the 8-bit payload never clips. ``sigma_src = 2**k`` for synapses from
``INPUT`` and ``1`` for spikes (integer source units per float source unit).

Layer: one integer ``scale[c]`` per output channel c (state units per float threshold
unit). A float current ``W * out_src`` reaches the state as ``(w * src) << 6`` with
``w = 2 * m`` (Lava's mixed-sign storage), so ``m = rint(W[c] * scale[c] / (2 * 64 *
sigma_src))``; every synapse into channel c shares ``scale[c]`` (a layer mixing input and
spike sources gets mantissas divided by its own ``sigma_src``). Per channel, not per layer:
after normalisation the rows of a layer's weights are scaled by 1/theta[c], and thresholds of
one layer can differ by two orders of magnitude (a nearly silent channel), so one scale per
layer would leave most rows with a few weight levels. ``scale[c]`` is the largest integer
allowed by

* the weights: ``m`` must stay in ``[-128, 127]`` for every synapse row into channel c;
* the threshold: ``vth[c] = scale[c] <= target.vth_max`` (2**22: v can reach ~2 vth in 24
  bits);
* the biases: ``max_t |b[t, c]| * scale[c] <= 4095 << 7`` so every bias has a mantissa;
* readout only: one common scale for all channels (the prediction is an argmax across
  them), also bounded by the provable accumulation ``scale * bound < 2**23`` (``bound`` =
  ``T * (sum_i |W_oi| * max|src| + max|b|) + |v_init|``, or ``readout_bound`` if given),
  so the 24-bit readout never saturates. When that bound sets the scale (large T), the
  readout's weight mantissas are taken at ``scale * 2**k`` instead and its synapses get
  ``weight_exp = -k`` (``readout_shift``): the weights keep their 8 bits and each step's
  sum is floored by k bits, instead of the weights being rounded to a few levels.

``vth = scale`` for spiking layers, ``0`` for the readout (it has no compare).
Bias: ``b_state[t, c] = (bias[c] + bias_schedule[t, c]) * scale[c]``; one exponent per
layer, the smallest ``e`` in the target's range with ``max|rint(b_state / 2**e)| <= 4095``;
``bias_mant = rint(b_state / 2**e)``. ``v_init[c] = rint(v_init[c] * scale[c])``.
``weight_exp = 0``; ``depth`` = synaptic hops from the input (``hw_targets.timing``).

``validate`` lists every violation of the target's limits; ``check`` raises them together.
Nothing is ever clipped: a value that does not fit is reported, not bent.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np

from core.errors import HardwareLimitError, InputError, Violation
from core.ir import (INPUT, InputSpec, NeuronLayer, QInput, QLayer, QSynapse,
                     QuantGraph, SnnGraph, Synapse, SynapseKind, frozen_array)
from hw_targets import Target
from hw_targets.timing import layer_depths, synapse_delay

DEFAULT_INPUT_RANGE = (0.0, 1.0)


# --------------------------------------------------------------------------- input

def input_abs_max(spec: InputSpec | QInput, data_range: tuple[float, float]) -> float:
    """max |x'| over x in ``data_range`` (per channel, then over channels)."""
    lo, hi = data_range
    if spec.mean is None:
        return float(max(abs(lo), abs(hi)))
    mean = np.asarray(spec.mean, dtype=np.float64)
    std = np.abs(np.asarray(spec.std, dtype=np.float64))
    return float(np.max(np.maximum(np.abs(lo - mean), np.abs(hi - mean)) / std))


def input_scale_exp(abs_max: float, limit: int = 127) -> int:
    """Largest k with ``abs_max * 2**k <= limit`` (0 for an all-zero input)."""
    if not math.isfinite(abs_max):
        raise InputError(f"input transform gives unbounded values (max |x'| = {abs_max}); "
                         "check the model's input std")
    if abs_max <= 0:
        return 0
    k = math.floor(math.log2(limit / abs_max))
    while abs_max * 2.0 ** (k + 1) <= limit:
        k += 1
    while abs_max * 2.0 ** k > limit:
        k -= 1
    return k


def quantize_input(spec: InputSpec, target: Target, scale_exp: int | None,
                   data_range: tuple[float, float]) -> QInput:
    """``QInput`` with ``scale_exp`` given or chosen so the payload never clips."""
    if scale_exp is None:
        scale_exp = input_scale_exp(input_abs_max(spec, data_range), target.payload_max - 1)
    return QInput(shape=tuple(spec.shape), scale_exp=int(scale_exp),
                  mean=None if spec.mean is None else frozen_array(spec.mean),
                  std=None if spec.std is None else frozen_array(spec.std))


# --------------------------------------------------------------------------- scales

def unit_factor(target: Target) -> int:
    """State units per (mantissa x source unit): weight_step * 2**act_shift = 128."""
    return target.weight_step << target.act_shift


def rows(weight: np.ndarray) -> np.ndarray:
    """(O, fan-in) view of a dense or conv weight: row c feeds output channel c."""
    w = np.asarray(weight, dtype=np.float64)
    return w.reshape(w.shape[0], -1)


def per_row(values: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) values shaped to broadcast over a weight of ``ndim`` dimensions."""
    return np.asarray(values, dtype=np.float64).reshape((-1,) + (1,) * (ndim - 1))


def weight_scale_limit(weight: np.ndarray, sigma: float, target: Target) -> np.ndarray:
    """Per output channel, the largest ``scale`` keeping ``rint(W * scale / (128 sigma))``
    in [-128, 127]."""
    per_unit = unit_factor(target) * sigma
    w = rows(weight)
    hi, lo = w.max(axis=1, initial=0.0), w.min(axis=1, initial=0.0)
    with np.errstate(divide="ignore"):
        pos = np.where(hi > 0, target.mantissa_max * per_unit / hi, math.inf)
        neg = np.where(lo < 0, -target.mantissa_min * per_unit / -lo, math.inf)
    return np.minimum(pos, neg)


def bias_float(layer: NeuronLayer, timesteps: int) -> np.ndarray:
    """(T, C) float bias per step: constant bias plus the FTBC schedule (if any)."""
    bias = np.broadcast_to(np.asarray(layer.bias, dtype=np.float64), (timesteps, layer.channels))
    if layer.bias_schedule is None:
        return np.array(bias)
    return bias + np.asarray(layer.bias_schedule, dtype=np.float64)


def bias_scale_limit(b: np.ndarray, target: Target) -> np.ndarray:
    """Per channel, the largest ``scale`` at which every bias fits ``4095 << bias_exp_max``."""
    peak = np.max(np.abs(b), axis=0, initial=0.0)
    with np.errstate(divide="ignore"):
        return np.where(peak > 0, target.bias_mant_max * 2.0 ** target.bias_exp_max / peak,
                        math.inf)


def fan_in_abs_sum(syn: Synapse) -> float:
    """max over outputs of sum_i |W_oi| (conv: over in-channels and kernel taps)."""
    w = np.abs(np.asarray(syn.weight, dtype=np.float64))
    return float(np.max(w.reshape(w.shape[0], -1).sum(axis=1), initial=0.0))


def readout_bound_float(layer: NeuronLayer, b: np.ndarray, src_max: Mapping[str, float],
                        timesteps: int) -> float:
    """Provable bound on |v| of the readout after T steps, in float units."""
    per_step = sum(fan_in_abs_sum(s) * src_max[s.source] for s in layer.synapses)
    per_step += float(np.max(np.abs(b), initial=0.0))
    return timesteps * per_step + float(np.max(np.abs(layer.v_init), initial=0.0))


def scale_limits(layer: NeuronLayer, sigma: Mapping[str, float], b: np.ndarray,
                 target: Target, readout_bound: float | None) -> dict[str, np.ndarray]:
    """Per constraint name, the largest scale each channel allows (C,)."""
    chans = layer.channels
    limits = {"weights": np.full(chans, math.inf), "vth_max": np.full(chans, target.vth_max),
              "bias": bias_scale_limit(b, target)}
    for s in layer.synapses:
        limits["weights"] = np.minimum(limits["weights"],
                                       weight_scale_limit(s.weight, sigma[s.source], target))
    if layer.readout and readout_bound is not None and readout_bound > 0:
        limits["readout_accumulation"] = np.full(chans, target.state_max / readout_bound)
    return limits


def layer_scale(limits: Mapping[str, np.ndarray], readout: bool) -> tuple[np.ndarray, dict]:
    """Per-channel integer scales (C,) int64 from ``scale_limits`` and, per constraint name,
    how many channels it set. The readout gets one common scale (its channels are compared
    by argmax)."""
    table = np.stack([np.asarray(v, dtype=np.float64) for v in limits.values()])
    if readout:
        table = np.repeat(table.min(axis=1, keepdims=True), table.shape[1], axis=1)
    names, which = list(limits), table.argmin(axis=0)
    bound = {names[k]: int(np.count_nonzero(which == k)) for k in sorted(set(which.tolist()))}
    # At least 1: a smaller limit means absurd float values; they stay unclipped and
    # validate() reports them.
    scale = np.maximum(1, np.floor(np.minimum(table.min(axis=0), 2.0 ** 40))).astype(np.int64)
    return scale, bound


# --------------------------------------------------------------------------- integers

def quantize_weight(weight: np.ndarray, scale: np.ndarray, sigma: float,
                    target: Target) -> np.ndarray:
    """Effective weights ``2 * rint(W[c] * scale[c] / (128 sigma))`` (no clipping): int32,
    or int64 when a value would not fit int32, so validate() reports the true value."""
    w = np.asarray(weight, dtype=np.float64)
    mant = np.rint(w * per_row(scale, w.ndim) / (unit_factor(target) * sigma)) * target.weight_step
    peak = float(np.abs(mant).max()) if mant.size else 0.0
    if peak > _INT64_EXACT:  # no integer type holds it: a cast would give garbage
        raise _Unrepresentable(peak)
    return mant.astype(np.int32 if peak <= np.iinfo(np.int32).max else np.int64)


_INT64_EXACT = 2.0 ** 62


class _Unrepresentable(ValueError):
    """Integer weights beyond int64 (absurd float weights); ``quantize`` names the layer."""

    def __init__(self, peak: float):
        super().__init__(peak)
        self.peak = peak


def bias_exponent(b_state: np.ndarray, target: Target) -> int:
    """Smallest exponent in range whose mantissas fit; the largest one if none does."""
    for e in range(target.bias_exp_min, target.bias_exp_max + 1):
        mant = np.rint(b_state / 2.0 ** e)
        if mant.size == 0 or (mant.min() >= target.bias_mant_min
                              and mant.max() <= target.bias_mant_max):
            return e
    return target.bias_exp_max


def quantize_bias(b: np.ndarray, scale: np.ndarray, target: Target
                  ) -> tuple[np.ndarray, int]:
    """(T, C) int64 mantissas and the layer's exponent for float biases ``b``."""
    b_state = b * np.asarray(scale, dtype=np.float64)[None, :]
    e = bias_exponent(b_state, target)
    return np.rint(b_state / 2.0 ** e).astype(np.int64), e


def quantize_synapse(syn: Synapse, scale: np.ndarray, sigma: float, target: Target,
                     shift: int = 0) -> QSynapse:
    """Integer synapse with the same geometry: mantissas at ``scale * 2**shift`` and
    ``weight_exp = -shift`` (``readout_shift``; 0 everywhere else)."""
    w = quantize_weight(syn.weight, np.asarray(scale, np.float64) * 2.0 ** shift, sigma, target)
    return QSynapse(source=syn.source, kind=syn.kind, weight=frozen_array(w),
                    weight_exp=-shift, stride=tuple(syn.stride), padding=tuple(syn.padding),
                    dilation=tuple(syn.dilation), groups=int(syn.groups))


def readout_shift(layer: NeuronLayer, limits: Mapping[str, np.ndarray], target: Target,
                  timesteps: int, readout_bound: float) -> tuple[np.ndarray, int] | None:
    """(scale, k) for a readout whose T-step accumulation bound, not its weights, set the
    scale: the weight mantissas are taken at ``scale * 2**k`` (as many bits as the weights
    allow, up to ``-weight_exp_min``) and shifted right by k each step (``weight_exp = -k``,
    a floor), so they keep their 8 bits however large T is. The floor adds less than one
    unit (64 state units) per synapse and step, so the scale leaves ``64 T`` per synapse of
    headroom below 2**23 on top of the float bound. None when no shift helps (or the target
    cannot give the readout's conv synapses an exponent): keep the plain scale. ``limits``:
    the layer's ``scale_limits``, whose accumulation limit is replaced by the one with the
    floors' headroom."""
    floor_room = (1 << target.act_shift) * timesteps * len(layer.synapses)
    room = (target.state_max - floor_room) / readout_bound
    w_lim = float(limits["weights"].min())
    other = min(float(limits["bias"].min()), float(limits["vth_max"].min()), room)
    scale = max(1.0, math.floor(min(other, w_lim)))
    k, k_max = 0, -target.weight_exp_min
    if not target.conv_weight_exp and any(s.kind is SynapseKind.CONV for s in layer.synapses):
        k_max = 0  # the target runs conv synapses without an exponent (loihi2-sim)
    while k < k_max and scale * 2.0 ** (k + 1) <= w_lim:
        k += 1
    return (np.full(layer.channels, scale, dtype=np.int64), k) if k else None


# --------------------------------------------------------------------------- statistics

def relative_errors(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``|approx - exact| / max|exact|`` elementwise (zeros when exact is all zero)."""
    peak = float(np.max(np.abs(exact), initial=0.0))
    diff = np.abs(np.asarray(approx, dtype=np.float64) - exact).ravel()
    return diff / peak if peak > 0 else diff


def error_stats(errors: Iterable[np.ndarray]) -> dict[str, float]:
    """Max and mean of concatenated relative errors."""
    flat = np.concatenate([np.ravel(e) for e in errors] or [np.zeros(0)])
    if flat.size == 0:
        return {"max": 0.0, "mean": 0.0}
    return {"max": float(flat.max()), "mean": float(flat.mean())}


def min_max(values: np.ndarray) -> dict[str, float]:
    return {"min": float(np.min(values)), "max": float(np.max(values))}


def layer_stats(layer: NeuronLayer, q: QLayer, sigma: Mapping[str, float], b: np.ndarray,
                limit: Mapping[str, int], target: Target) -> dict[str, Any]:
    """JSON-able quantization statistics of one layer (errors relative to each float
    array's max |value|)."""
    unit = unit_factor(target)
    w_err = [relative_errors(qs.weight * (sigma[s.source] * 2.0 ** qs.weight_exp
                                          * (1 << target.act_shift))
                             / per_row(q.scale, qs.weight.ndim), s.weight)
             for s, qs in zip(layer.synapses, q.synapses)]
    b_err = relative_errors(q.bias_mant * 2.0 ** q.bias_exp / q.scale[None, :], b)
    mant = max((int(np.max(np.abs(s.weight))) // target.weight_step for s in q.synapses),
               default=0)
    return {"scale": min_max(q.scale), "mantissa_scale": min_max(q.scale / unit),
            "scale_limited_by": dict(limit), "weight_error": error_stats(w_err),
            "bias_error": error_stats([b_err]), "bias_exp": int(q.bias_exp),
            "weight_exp": [int(s.weight_exp) for s in q.synapses],
            "max_abs_mantissa": mant, "depth": int(q.depth), "vth": min_max(q.vth)}


# --------------------------------------------------------------------------- graph

def require_normalised(snn: SnnGraph) -> None:
    """InputError naming every spiking layer whose thresholds are not all 1."""
    bad = [layer.name for layer in snn.layers
           if not layer.readout and not np.allclose(layer.threshold, 1.0, rtol=0, atol=1e-9)]
    if bad:
        raise InputError(f"quantize needs a normalised SnnGraph (thresholds 1); run "
                         f"toolchain.normalize first. Layers with other thresholds: {bad}")


def source_units(snn: SnnGraph, qin: QInput, input_range: tuple[float, float]
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """Per source: integer units per float unit (sigma: 2**k for the input, 1 for spikes)
    and max |float output| (max |x'| for the input, 1 for spikes)."""
    sigma = {INPUT: 2.0 ** qin.scale_exp, **{layer.name: 1.0 for layer in snn.layers}}
    peak = {INPUT: input_abs_max(snn.input, input_range),
            **{layer.name: 1.0 for layer in snn.layers}}
    return sigma, peak


def quantize_layer(layer: NeuronLayer, sigma: Mapping[str, float], peak: Mapping[str, float],
                   timesteps: int, depth: int, target: Target,
                   readout_bound: float | None) -> tuple[QLayer, dict[str, Any]]:
    """One ``NeuronLayer`` -> ``QLayer`` plus its statistics."""
    b = bias_float(layer, timesteps)
    if layer.readout and readout_bound is None:
        readout_bound = readout_bound_float(layer, b, peak, timesteps)
    limits = scale_limits(layer, sigma, b, target, readout_bound)
    scale, limit = layer_scale(limits, layer.readout)
    shift = 0
    shifted = (readout_shift(layer, limits, target, timesteps, readout_bound)
               if layer.readout and limit.get("readout_accumulation") else None)
    if shifted is not None:
        scale, shift = shifted
    bias_mant, bias_exp = quantize_bias(b, scale, target)
    v_init = np.rint(np.asarray(layer.v_init, dtype=np.float64) * scale).astype(np.int64)
    vth = np.zeros_like(scale) if layer.readout else scale
    q = QLayer(name=layer.name, shape=tuple(layer.shape),
               synapses=tuple(quantize_synapse(s, scale, sigma[s.source], target, shift)
                              for s in layer.synapses),
               vth=frozen_array(vth, np.int64), bias_mant=frozen_array(bias_mant, np.int64),
               bias_exp=bias_exp, v_init=frozen_array(v_init, np.int64), depth=depth,
               scale=frozen_array(scale, np.float64), readout=layer.readout,
               origin=layer.origin, signed=layer.signed)
    stats = layer_stats(layer, q, sigma, b, limit, target)
    if layer.readout:
        stats["readout_bound"] = float(readout_bound or 0.0)
    return q, stats


def quantize(snn: SnnGraph, target: Target, *, input_scale_exp: int | None = None,
             input_range: tuple[float, float] = DEFAULT_INPUT_RANGE,
             readout_bound: float | None = None) -> QuantGraph:
    """Normalised ``SnnGraph`` -> ``QuantGraph`` for ``target`` (scheme: module docstring).

    ``input_range``: the range of the raw input x (chooses ``QInput.scale_exp`` unless
    ``input_scale_exp`` is given). ``readout_bound``: max |float readout| to provision for
    (default: the provable worst case, so the readout never saturates)."""
    if not target.quantized:
        raise InputError(f"target {target.name!r} is not quantized: use the float SnnGraph")
    require_normalised(snn)
    qin = quantize_input(snn.input, target, input_scale_exp, input_range)
    sigma, peak = source_units(snn, qin, input_range)
    depths = layer_depths(snn.layers)
    layers, stats = [], {}
    for layer in snn.layers:
        try:
            q, stats[layer.name] = quantize_layer(layer, sigma, peak, snn.timesteps,
                                                  depths[layer.name], target, readout_bound)
        except _Unrepresentable as exc:
            raise HardwareLimitError(target.name, [_v(
                layer.name, "weight", exc.peak, f"[{target.weight_min}, {target.weight_max}]",
                "beyond any integer type: the model's weights are absurdly large (threshold "
                "normalization carries every layer's scale down to this one); check them "
                "for values like 1e30")]) from None
        layers.append(q)
    meta = {"input_range": [float(v) for v in input_range], "quantization": stats,
            "source": dict(snn.meta)}
    return QuantGraph(input=qin, layers=tuple(layers), timesteps=snn.timesteps,
                      target=target.name, meta=meta)


# --------------------------------------------------------------------------- validation

def _v(layer: str, quantity: str, value: Any, limit: str, hint: str = "") -> Violation:
    return Violation(layer=layer, quantity=quantity, value=float(value), limit=limit, hint=hint)


def input_violations(q: QuantGraph, target: Target) -> list[Violation]:
    """The encoded input must fit the graded-spike payload over the declared data range."""
    data_range = tuple(q.meta.get("input_range", DEFAULT_INPUT_RANGE))
    peak = float(np.rint(input_abs_max(q.input, data_range) * 2.0 ** q.input.scale_exp))
    if peak <= target.payload_max - 1:
        return []
    return [_v(INPUT, "max |x_int|", peak, f"{target.payload_max - 1} "
               f"({target.input_payload_bits}-bit graded spike payload)",
               "lower QInput.scale_exp")]


def synapse_violations(layer: QLayer, syn: QSynapse, src_max: float,
                       target: Target) -> list[Violation]:
    """Weight range and parity, weight exponent, worst-case 24-bit accumulation."""
    w, out, name = syn.weight.astype(np.int64), [], f"{layer.name}<-{syn.source}"
    if w.size and (w.min() < target.weight_min or w.max() > target.weight_max):
        worst = w.min() if w.min() < target.weight_min else w.max()
        out.append(_v(name, "weight", worst, f"[{target.weight_min}, {target.weight_max}]",
                      "weights are stored 8-bit mixed sign (Lava Dense)"))
    if w.size and np.any(w % target.weight_step):
        out.append(_v(name, "odd weights", int(np.count_nonzero(w % target.weight_step)),
                      f"multiples of {target.weight_step}", "mixed sign drops the LSB"))
    if not target.weight_exp_min <= syn.weight_exp <= target.weight_exp_max:
        out.append(_v(name, "weight_exp", syn.weight_exp,
                      f"[{target.weight_exp_min}, {target.weight_exp_max}]"))
    elif syn.kind is SynapseKind.CONV and syn.weight_exp != 0 and not target.conv_weight_exp:
        out.append(_v(name, "conv weight_exp", syn.weight_exp, "0",
                      f"{target.name} runs conv synapses as Lava's Conv, which has no weight "
                      f"exponent; fold 2**weight_exp into the weights"))
    acc = float(np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max(initial=0)) * src_max
    limit = (1 << (target.synapse_acc_bits - 1)) - 1
    if acc > limit:
        out.append(_v(name, "worst-case accumulation", acc, f"{limit} (24-bit synapse output)",
                      "reduce the layer's scale or fan-in"))
    return out


def neuron_violations(layer: QLayer, timesteps: int, target: Target) -> list[Violation]:
    """Bias mantissa/exponent, threshold and initial membrane of one layer."""
    out, mant = [], layer.bias_mant.astype(np.int64)
    if mant.shape != (timesteps, layer.shape[0]):
        out.append(_v(layer.name, "bias_mant rows", mant.shape[0],
                      f"shape (T={timesteps}, C={layer.shape[0]})"))
    if mant.size and (mant.min() < target.bias_mant_min or mant.max() > target.bias_mant_max):
        worst = mant.min() if mant.min() < target.bias_mant_min else mant.max()
        out.append(_v(layer.name, "bias_mant", worst,
                      f"[{target.bias_mant_min}, {target.bias_mant_max}] (13-bit signed)",
                      "bias too large for the layer's scale"))
    if not target.bias_exp_min <= layer.bias_exp <= target.bias_exp_max:
        out.append(_v(layer.name, "bias_exp", layer.bias_exp,
                      f"[{target.bias_exp_min}, {target.bias_exp_max}] (3-bit unsigned)"))
    return out + threshold_violations(layer, target)


def threshold_violations(layer: QLayer, target: Target) -> list[Violation]:
    """0 < vth[c] <= vth_max and state_min <= v_init[c] < vth[c] (readout: v_init in the
    state range)."""
    v0, vth, out = layer.v_init.astype(np.int64), np.asarray(layer.vth, np.int64), []
    top = np.full_like(v0, target.state_max + 1) if layer.readout else vth
    bad_vth = (vth <= 0) | (vth > target.vth_max)
    if not layer.readout and np.any(bad_vth):
        out.append(_v(layer.name, "vth", int(vth[bad_vth][0]), f"(0, {target.vth_max}]",
                      f"{int(bad_vth.sum())} channel(s); the threshold must leave 24-bit "
                      f"headroom"))
    bad_v0 = (v0 < target.state_min) | (v0 >= top)
    if np.any(bad_v0):
        c = int(np.flatnonzero(bad_v0)[0])
        out.append(_v(layer.name, "v_init", int(v0[c]),
                      f"[{target.state_min}, {int(top[c])}) (channel {c})"))
    return out


def delay_violations(q: QuantGraph, target: Target) -> list[Violation]:
    """Layer depths as ``hw_targets.timing`` computes them, and every synapse's delay (the
    extra steps that align a residual input, ``timing.synapse_delay``) within the target's
    synaptic delay field."""
    depth, out = layer_depths(q.layers), []
    for layer in q.layers:
        if layer.depth != depth[layer.name]:
            out.append(_v(layer.name, "depth", layer.depth, f"== {depth[layer.name]} hops"))
        for syn in layer.synapses:
            delay = synapse_delay(layer, syn, depth)
            if delay > target.max_synaptic_delay:
                out.append(_v(f"{layer.name}<-{syn.source}", "synaptic delay", delay,
                              f"{target.max_synaptic_delay} steps ({target.name}'s synaptic "
                              f"delay field)", _delay_hint(layer, depth, target)))
    return out


def _delay_hint(layer: QLayer, depth: Mapping[str, int], target: Target) -> str:
    """Which inputs arrive when, and what to do about it on ``target``."""
    arrivals = ", ".join(f"{name} at depth {d}" for name, d in sorted(
        {s.source: depth[s.source] for s in layer.synapses}.items(), key=lambda kv: kv[1]))
    why = f"residual input: its sources ({arrivals}) are aligned by synaptic delays"
    if target.max_synaptic_delay == 0:
        return f"{why}, which {target.name} does not have; use --target loihi2"
    return (f"{why}; shorten the shortcut so that it skips at most "
            f"{target.max_synaptic_delay + 1} layers")


def validate(q: QuantGraph, target: Target) -> list[Violation]:
    """Every violation of ``target``'s limits in ``q`` (empty list: it fits)."""
    if not target.quantized:
        return []
    out = input_violations(q, target) + delay_violations(q, target)
    for layer in q.layers:
        out += neuron_violations(layer, q.timesteps, target)
        for syn in layer.synapses:
            src_max = target.payload_max if syn.source == INPUT else 1
            out += synapse_violations(layer, syn, src_max, target)
    return out


def check(q: QuantGraph, target: Target) -> None:
    """Raise ``HardwareLimitError`` (exit 3) listing every violation, if any."""
    violations = validate(q, target)
    if violations:
        raise HardwareLimitError(target.name, violations)


# --------------------------------------------------------------------------- report

def quantization_report(q: QuantGraph) -> dict[str, Any]:
    """JSON-able per-layer scales, exponents, thresholds, depths and errors."""
    stats = q.meta.get("quantization", {})
    layers = {}
    for layer in q.layers:
        entry = {"vth": min_max(layer.vth), "scale": min_max(layer.scale),
                 "bias_exp": int(layer.bias_exp), "depth": int(layer.depth),
                 "readout": bool(layer.readout),
                 "weight_exp": [int(s.weight_exp) for s in layer.synapses]}
        layers[layer.name] = {**entry, **stats.get(layer.name, {})}
    return {"target": q.target, "timesteps": int(q.timesteps),
            "input": {"scale_exp": int(q.input.scale_exp),
                      "range": list(q.meta.get("input_range", DEFAULT_INPUT_RANGE))},
            "layers": layers}
