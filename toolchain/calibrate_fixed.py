"""FTBC in the integer domain: bias correction of a quantized network on the network itself.

``toolchain.calibrate`` fits the float bias schedules before quantization, so the rounding of
weights, thresholds and biases (and the 24-bit state) is never corrected. This pass runs the
same Forward Temporal Bias Correction after ``exporters.quantize``, on the ``QuantGraph``,
with the bit-exact integer emulator (``sims.emulator``): the spikes it corrects are exactly
the spikes the hardware will produce, and the result is again integer bias mantissas.

Target. For spiking layer l with float threshold theta[c] (of the converted SnnGraph, before
normalisation; the QuantGraph carries none), one spike carries theta: the rate an IF neuron
should produce per step is ``abar = clip(a_l / theta, 0, 1)``. ``mean_c`` is the mean over
batch and positions of channel c.

Update. For each spiking layer in topological order (upstream layers already calibrated, their
integer spike trains cached), each iteration and calibration batch, for t = 1..T::

    v  = clamp(v + (a[t] << 6) + (bias_mant[t, c] << bias_exp))     (sims.reference)
    s(t) = v >= vth[c]
    bias_mant[t, c] += rint(alpha * mean_c(abar - s(t)) * vth[c] / 2**bias_exp)
    bias_mant[t, c]  = clip(bias_mant[t, c], target.bias_mant_min, target.bias_mant_max)
    the step is re-fired with the updated bias before moving on (as toolchain.calibrate)

(vth[c] state units = one float threshold, so ``mean_c(abar - s) * vth`` is the float
update ``mean_c(abar_float - theta * s)`` in state units.) The layer's ``bias_exp`` is kept:
an update that does not fit 13 bits is clipped to the limit and counted in the report
(``clamped``), so the graph stays valid for the target; nothing else changes (weights, vth,
v_init, the readout).

Selection, as ``toolchain.calibrate`` (on held-out *training* samples only): a layer's new
mantissas are kept only if they lower the held-out error of the network output against the
ANN logits, ``E = (1/T) sum_t mean (v_out(t) / (t * scale_out) - z_ANN)^2`` (upstream as kept,
downstream not yet recalibrated); finally, if the held-out argmax agreement with the ANN
(mean over t) falls below that of the input graph, every layer is reverted.

Cost. Per layer: ``iterations * batches`` passes over the layer's T steps on its cached input
currents, plus one integer forward of the layer per batch and a downstream forward of the
held-out set for the keep rule (no L x T full-network forwards).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from exporters.quantize import validate
from hw_targets import Target
from sims.emulator import (PAYLOAD_BITS, SHIFT, LayerPlan, clamp_state, exact_float_math,
                           initial_state, input_current, plan_graph, plan_layer,
                           run_neurons, spike_current, step_drive)
from sims.progress import progress_bar
from sims.reference import encode_input
from sims.torch_snn import last_consumers
from toolchain.ann import ann_forward
from toolchain import distributed
from toolchain.calibrate import (_check as check_hyperparameters, agreement, local_rows,
                                 running_logit_error, split_calibration)
from toolchain.errors import InputError
from toolchain.ir import INPUT, AnnGraph, QuantGraph, SnnGraph, evolve

CURRENT_CACHE_BYTES = 1 << 28  # cache a layer's fit currents across iterations below 256 MiB


@dataclass(frozen=True, eq=False)
class _Batch:
    """Encoded graded input (B, *shape) float32 (exact integers), per spiking layer the target
    rate ``mean_c(clip(a / theta, 0, 1))`` (C,) float64, the ANN logits (B, K) and the cached
    integer spike trains (T, B, n) uint8 of calibrated layers (filled layer by layer)."""
    x: torch.Tensor
    targets: dict
    logits: torch.Tensor
    spikes: dict


# --------------------------------------------------------------------------- public API

def float_thresholds(snn: SnnGraph) -> dict[str, np.ndarray]:
    """Per spiking layer, the float thresholds theta (C,) of a converted (not normalised)
    SnnGraph: what ``calibrate_fixed`` needs to turn ANN activations into spike rates."""
    if snn.meta.get("normalized"):
        raise InputError("float_thresholds needs the SnnGraph before normalisation")
    return {l.name: np.asarray(l.threshold, dtype=np.float64)
            for l in snn.layers if not l.readout}


def calibrate_fixed(q: QuantGraph, ann: AnnGraph, x_calib: np.ndarray, *,
                    thresholds: Mapping[str, np.ndarray], target: Target,
                    alpha: float = 0.5, batches: int = 5, batch_size: int = 128,
                    iterations: int = 3, holdout: float = 0.2, seed: int = 0,
                    progress: bool = False) -> tuple[QuantGraph, dict]:
    """Return (QuantGraph with corrected ``bias_mant``, report). ``x_calib``: training samples
    only; ``thresholds``: ``float_thresholds(converted_snn)``; ``target``: the hardware target
    ``q`` was quantized for (its 13-bit bias range bounds the mantissas).

    The report holds the hyper-parameters, seconds, per-layer ``layers[name] = {kept,
    holdout_error_before, holdout_error_after, clamped, changed}`` and the held-out agreement
    with the ANN before/after (``holdout``); ``q.meta["fixed_calibration"]`` a summary."""
    check_hyperparameters("ftbc", alpha, batches, batch_size, iterations, holdout, x_calib)
    _check_graph(q, thresholds, target)
    start = time.perf_counter()
    report: dict[str, Any] = {"method": "ftbc-fixed", "alpha": float(alpha),
                              "batches": batches, "batch_size": batch_size,
                              "iterations": iterations, "holdout_fraction": float(holdout),
                              "seed": seed, "target": target.name}
    with torch.no_grad(), exact_float_math():
        new, details = _calibrate(q, ann, x_calib, thresholds, target, alpha, batches,
                                  batch_size, iterations, holdout, seed, progress)
    report.update(details, seconds=time.perf_counter() - start)
    return evolve(new, meta={**new.meta, "fixed_calibration": _summary(report)}), report


# --------------------------------------------------------------------------- driver

def _check_graph(q: QuantGraph, thresholds: Mapping[str, np.ndarray], target: Target) -> None:
    problems = []
    if not target.quantized or q.target != target.name:
        problems.append(f"target {target.name!r} must be the quantized target of the graph "
                        f"({q.target!r})")
    for layer in q.layers:
        if layer.readout:
            continue
        theta = thresholds.get(layer.name)
        if theta is None or np.shape(theta) != (layer.shape[0],):
            got = None if theta is None else np.shape(theta)
            problems.append(f"layer {layer.name}: need float thresholds of shape "
                            f"({layer.shape[0]},), got {got}")
    if not q.layers or not q.layers[-1].readout:
        problems.append("the last layer must be the readout")
    if problems:
        raise InputError("calibrate_fixed: " + "; ".join(problems))


def _calibrate(q, ann, x_calib, thresholds, target, alpha, batches, batch_size, iterations,
               holdout, seed, progress=False) -> tuple[QuantGraph, dict]:
    parts, hold_x = split_calibration(x_calib, holdout, batches, batch_size, seed)
    cal = [_make_batch(q, ann, local_rows(p), thresholds) for p in parts]
    hold = _make_batch(q, ann, local_rows(hold_x), thresholds) if len(hold_x) else None
    layers, plans = list(q.layers), list(plan_graph(q))
    last, shapes = last_consumers(q), _shapes(q)
    layers_report, error = {}, None
    spiking = sum(not layer.readout for layer in q.layers)
    with progress_bar(spiking, "calibrate fixed point", progress, unit="layer") as bar:
        for index, layer in enumerate(q.layers):
            if layer.readout:
                continue
            mant, layers_report[layer.name] = _calibrate_layer(
                q, plans, index, cal, hold, alpha, iterations, target, error)
            error = layers_report[layer.name].get("holdout_error")
            if layers_report[layer.name]["kept"]:
                layers[index] = evolve(layer, bias_mant=mant)
                plans[index] = plan_layer(layers[index], shapes)
            for b in cal + ([hold] if hold else []):
                b.spikes[layer.name] = layer_output(plans[index], b.x, b.spikes,
                                                    q.timesteps).to(torch.uint8)
                _free(b, last, index)
            bar.update(1)
    new = evolve(q, layers=tuple(layers))
    guard = _guard(q, plans, hold)
    if guard.get("reverted"):
        new = q
    details = {"batches_used": len(cal), "calib_samples": int(sum(len(p) for p in parts)),
               "holdout_samples": int(len(hold_x)), "layers": layers_report,
               "holdout": guard, "violations": [str(v) for v in validate(new, target)]}
    return new, details


def _shapes(q: QuantGraph) -> dict[str, tuple[int, ...]]:
    return {INPUT: tuple(q.input.shape), **{l.name: tuple(l.shape) for l in q.layers}}


def _make_batch(q: QuantGraph, ann: AnnGraph, x: np.ndarray,
                thresholds: Mapping[str, np.ndarray]) -> _Batch:
    logits, values = ann_forward(ann, x, record=True, dtype=torch.float32)
    targets = {}
    for layer in q.layers:
        if not layer.readout:
            a = values[layer.name].to(torch.float64).reshape(len(x), layer.shape[0], -1)
            theta = torch.from_numpy(np.array(thresholds[layer.name], np.float64))
            rate = (a / theta.reshape(1, -1, 1)).clamp(0.0, 1.0)
            targets[layer.name] = distributed.mean(rate, (0, 2))
    x_int = encode_input(q.input, x, PAYLOAD_BITS)
    return _Batch(torch.from_numpy(x_int.astype(np.float32)), targets, logits, {})


def _free(b: _Batch, last: dict, index: int) -> None:
    """Drop cached spike trains that no later layer reads."""
    for name in [n for n in b.spikes if last.get(n, -1) <= index]:
        del b.spikes[name]


# --------------------------------------------------------------------------- one layer

def _calibrate_layer(q, plans, index, cal, hold, alpha, iterations, target, before
                     ) -> tuple[np.ndarray, dict]:
    """Fit one layer's mantissas on the batches; keep them only if the holdout error drops.
    ``before``: the held-out error of the network as it stands (None: compute it)."""
    layer, lp = q.layers[index], plans[index]
    mant = torch.from_numpy(layer.bias_mant.astype(np.float64))  # exact integers
    limits = (float(target.bias_mant_min), float(target.bias_mant_max))
    cache = _fit_currents(lp, cal, q.timesteps)
    clamped = 0
    for _ in range(iterations):
        for i, b in enumerate(cal):
            cur = cache[i] if cache[i] is not None else fit_drive(lp, b.x, b.spikes,
                                                                  q.timesteps)
            clamped += _ftbc_pass(lp, layer, cur, b.targets[layer.name], mant, alpha, limits)
    new = mant.numpy().astype(np.int64)
    entry = {"clamped": clamped, "changed": int(np.count_nonzero(new != layer.bias_mant)),
             "max_abs_change": int(np.max(np.abs(new - layer.bias_mant), initial=0))}
    if hold is None:
        return new, {**entry, "kept": True}
    candidate = plan_layer(evolve(layer, bias_mant=new), _shapes(q))
    before = _holdout_error(q, plans, index, lp, hold) if before is None else before
    after = _holdout_error(q, plans, index, candidate, hold)
    kept = after < before
    return new, {**entry, "kept": bool(kept), "holdout_error_before": before,
                 "holdout_error_after": after, "holdout_error": min(before, after)}


def _fit_currents(lp: LayerPlan, cal: list[_Batch], steps: int) -> list[torch.Tensor | None]:
    """Each batch's fit drive, computed once for all iterations when it fits the budget."""
    spiking = any(p.source != INPUT for p in lp.synapses)
    rows = sum(b.x.shape[0] for b in cal) * (steps if spiking else 1)
    if rows * lp.n * lp.vth.element_size() > CURRENT_CACHE_BYTES:
        return [None] * len(cal)
    return [fit_drive(lp, b.x, b.spikes, steps) for b in cal]


def fit_drive(lp: LayerPlan, x: torch.Tensor, trains: Mapping[str, torch.Tensor],
              steps: int) -> torch.Tensor:
    """``a << 6`` without the bias: (steps, B, n), or (B, n) when only the constant input
    feeds the layer (the same at every step)."""
    clamps = {lp.name: 0}
    const = input_current(lp, x, steps, clamps)
    a = spike_current(lp, trains, steps, x.shape[0], clamps)
    if a is None:
        return const.mul_(SHIFT)
    return (a if const is None else a.add_(const)).mul_(SHIFT)


def _ftbc_pass(lp: LayerPlan, layer, drive: torch.Tensor, target: torch.Tensor,
               mant: torch.Tensor, alpha: float, limits: tuple[float, float]) -> int:
    """One integer FTBC sweep t = 1..T over a batch; updates ``mant`` (T, C) in place.
    Returns how many updated mantissas were clipped to the 13-bit range."""
    batch = drive.shape[-2]
    v = initial_state(lp, batch)
    scratch, spikes = torch.empty_like(v), torch.empty_like(v)
    vth_c = torch.from_numpy(np.array(layer.vth, np.float64))
    unit = float(2 ** layer.bias_exp)
    clamped = 0
    for t in range(mant.shape[0]):
        base = v + (drive if drive.dim() == 2 else drive[t])
        pre = _add_bias(base.clone(), mant[t], unit, lp)
        clamp_state(pre, scratch)
        torch.ge(pre, lp.vth, out=spikes)
        rate = _channel_rate(spikes, lp.channels)
        step = torch.round(alpha * (target - rate) * vth_c / unit)
        updated = mant[t] + step
        clamped += int(((updated < limits[0]) | (updated > limits[1])).sum())
        mant[t] = updated.clamp_(*limits)
        v = _add_bias(base, mant[t], unit, lp)  # re-fire the step with the updated bias
        clamp_state(v, scratch)
        torch.ge(v, lp.vth, out=spikes)
        v.addcmul_(spikes, lp.vth, value=-1)
    return clamped


def _add_bias(v: torch.Tensor, mant_t: torch.Tensor, unit: float, lp: LayerPlan
              ) -> torch.Tensor:
    """v (B, n) += mant_t << bias_exp per channel, in place (exact: integers < 2**24)."""
    v.view(v.shape[0], lp.channels, -1).add_((mant_t * unit).to(v.dtype).view(-1, 1))
    return v


def _channel_rate(spikes: torch.Tensor, channels: int) -> torch.Tensor:
    """(C,) float64 fraction of ones per channel of a 0/1 (B, n) tensor (exact counts)."""
    return distributed.rate(spikes.view(spikes.shape[0], channels, -1), (0, 2))


# --------------------------------------------------------------------------- forwards

def layer_output(lp: LayerPlan, x: torch.Tensor, trains: Mapping[str, torch.Tensor],
                 steps: int) -> torch.Tensor:
    """All T steps of one layer on cached source spike trains, as ``sims.emulator`` runs
    it (bit-exact with ``sims.reference``): (T, B, n) spikes 0/1, or the readout membrane
    after each step, in the layer's float dtype (exact integers)."""
    batch, clamps = x.shape[0], {lp.name: 0}
    const = input_current(lp, x, steps, clamps)
    a = spike_current(lp, trains, steps, batch, clamps)
    drive = const.mul_(SHIFT) if a is None else step_drive(lp, const, a, 0, steps)
    v = initial_state(lp, batch)
    out = torch.empty((steps, batch, lp.n), dtype=lp.dtype)
    run_neurons(lp, drive, v, 0, out, torch.empty_like(v))
    return out


def _downstream_readout(q: QuantGraph, plans, index: int, lp: LayerPlan,
                        b: _Batch) -> torch.Tensor:
    """Readout (T, B, K) in float logit units: layer ``index`` run as ``lp``, downstream
    layers as planned, upstream from the cache."""
    trains = dict(b.spikes)
    out = layer_output(lp, b.x, trains, q.timesteps)
    if q.layers[index].readout:  # a single-layer network: the layer is the readout
        return readout_float(q, out)
    trains[q.layers[index].name] = out
    for k in range(index + 1, len(q.layers)):
        out = layer_output(plans[k], b.x, trains, q.timesteps)
        if q.layers[k].readout:
            return readout_float(q, out)
        trains[q.layers[k].name] = out
    raise AssertionError("the last layer is the readout")


def readout_float(q: QuantGraph, readout: torch.Tensor) -> torch.Tensor:
    """Integer readout membrane -> float logit units (divide by the readout's scale)."""
    scale = torch.from_numpy(np.array(q.readout.scale, np.float64))
    return readout.to(torch.float64) / scale


def _holdout_error(q, plans, index, lp, hold: _Batch) -> float:
    """E (module docstring) of the network with layer ``index`` run as ``lp``."""
    readout = _downstream_readout(q, plans, index, lp, hold)
    return running_logit_error(readout, hold.logits.to(torch.float64))


def _guard(q: QuantGraph, plans, hold: _Batch | None) -> dict:
    """Held-out readout agreement with the ANN before/after; revert when it drops."""
    if hold is None:
        return {}
    old = plan_graph(q)
    before = agreement(_downstream_readout(q, old, 0, old[0],
                                           _Batch(hold.x, {}, hold.logits, {})), hold.logits)
    after = agreement(readout_float(q, layer_output(plans[-1], hold.x, hold.spikes,
                                                    q.timesteps)), hold.logits)
    return {"agreement_before": float(before.mean()), "agreement_after": float(after.mean()),
            "agreement_before_at_T": float(before[-1]), "agreement_after_at_T": float(after[-1]),
            "reverted": bool(after.mean() < before.mean())}


def _summary(report: dict) -> dict:
    keys = ("method", "alpha", "batches", "batch_size", "iterations", "holdout_fraction",
            "seed", "target")
    layers = report.get("layers", {})
    return {**{k: report[k] for k in keys},
            "kept": {name: r.get("kept") for name, r in layers.items()},
            "clamped": {name: r.get("clamped", 0) for name, r in layers.items()},
            "reverted": report.get("holdout", {}).get("reverted", False)}
