"""Bias calibration of a converted SNN: ``none``, ``lp`` (SNN-Calibration light pipeline) and
``ftbc`` (Forward Temporal Bias Correction, Wu et al., ECCV 2024, Algorithm 1).

Target. For spiking layer l with threshold theta, the ANN activation it should reproduce is
``a_l`` clipped to what one step can carry: ``abar = clip(a_l, 0, theta)`` (an IF neuron's
output per step is 0 or theta). ``mean_c`` is the mean over batch and positions of channel c.

ftbc. For each layer in topological order (upstream layers already calibrated, their spike
trains cached), for each iteration and calibration batch, for t = 1..T::

    v  = v + I[t] + bias + b[t];  s(t) = v >= theta                      (as simulated)
    b[t] += alpha * mean_c(abar - theta * s(t))                          (paper's update)
    the step is re-fired with the updated b[t] before moving to t + 1     (authors' code)

lp. One bias per channel for all steps: b += mean_c(abar - theta * rate), rate = spikes / T,
full step per batch as SNN-Calibration's bias correction does.

Never worse than plain conversion (selected on held-out *training* data only):
``x_calib`` is split (seeded) into calibration batches and a ``holdout`` fraction. A layer's
new schedule is kept only if it lowers the held-out error of the network's output::

    E = (1/T) sum_t mean (v_out(t) / t - z_ANN)^2

(the readout's running estimate of the ANN logits at every step), with upstream layers as
kept and downstream layers not yet calibrated. (The layer-local alternative, the running-rate
error of the layer itself, ``SELECTION = "layer"``, rejected most corrections and measured
worse on digits; see the report.) Finally the readout's held-out agreement with the ANN's
argmax, averaged over t = 1..T, must not fall below that of the input network; otherwise
every schedule is reverted. The readout keeps a zero schedule (it has no threshold).

Cost. Calibrating layer l costs ``iterations * batches`` passes over layer l's T steps on its
cached input spike trains (one batched conv per chunk of steps), plus one pass per batch to
cache its own output: not L x T full-network forwards. Loop order is layer -> iteration ->
batch (each layer converges against its final upstream; the authors' iteration -> layer order
recalibrates against upstream layers that are still moving).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from sims.progress import progress_bar
from sims.torch_snn import (NeuronParams, chunk_steps, encode_input, fire, initial_membrane,
                            input_current, last_consumers, layer_currents, layer_output,
                            layer_step, neuron_params, run_layer,
                            synapse_current)
from toolchain import distributed
from toolchain.ann import ann_forward
from toolchain.errors import InputError
from toolchain.ir import INPUT, AnnGraph, SnnGraph, evolve

METHODS = ("none", "lp", "ftbc")
DTYPE = torch.float32
CURRENT_CACHE_BYTES = 1 << 29  # cache a layer's currents across iterations below 512 MiB


@dataclass(frozen=True, eq=False)
class _Batch:
    """A calibration (or holdout) batch: encoded input, clipped ANN targets per spiking layer,
    ANN logits, and the cached spike trains of calibrated layers (filled layer by layer)."""
    x: torch.Tensor
    targets: dict
    logits: torch.Tensor
    spikes: dict


# --------------------------------------------------------------------------- public API

def calibrate(snn: SnnGraph, ann: AnnGraph, x_calib: np.ndarray, *, method: str = "ftbc",
              alpha: float = 0.5, batches: int = 5, batch_size: int = 128,
              iterations: int = 3, holdout: float = 0.2, seed: int = 0,
              progress: bool = False) -> tuple[SnnGraph, dict]:
    """Return (calibrated SnnGraph, report). ``x_calib``: training samples only.
    ``progress``: a bar over the layers on stderr.

    The report holds method, alpha, batches, batch_size, iterations, seconds, per-layer
    ``layers[name] = {kept, holdout_error_before, holdout_error_after}`` (E below) and the
    held-out readout agreement with the ANN before/after (``holdout``)."""
    _check(method, alpha, batches, batch_size, iterations, holdout, x_calib)
    start = time.perf_counter()
    report: dict[str, Any] = {"method": method, "alpha": float(alpha), "batches": batches,
                              "batch_size": batch_size, "iterations": iterations,
                              "holdout_fraction": float(holdout), "seed": seed}
    if method == "none":
        new = _with_schedules(snn, {}, method)
        return new, {**report, "layers": {}, "seconds": time.perf_counter() - start}
    with torch.no_grad():
        new, details = _calibrate(snn, ann, x_calib, method, alpha, batches, batch_size,
                                  iterations, holdout, seed, progress)
    report.update(details, seconds=time.perf_counter() - start)
    return evolve(new, meta={**new.meta, "calibration": _summary(report)}), report


def split_calibration(x: np.ndarray, holdout: float, batches: int, batch_size: int,
                      seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Seeded split: up to ``batches`` batches of ``batch_size`` and the held-out part."""
    order = np.random.default_rng(seed).permutation(len(x))
    n_hold = min(len(x) - 1, max(1, int(round(holdout * len(x))))) if holdout > 0 else 0
    hold, rest = x[np.sort(order[:n_hold])], x[order[n_hold:]]
    parts = [rest[i * batch_size:(i + 1) * batch_size] for i in range(batches)]
    return [p for p in parts if len(p)], hold


def local_rows(x: np.ndarray) -> np.ndarray:
    """This rank's shard of a calibration batch (the whole batch in a single process)."""
    distributed.check_shardable(len(x), "a calibration batch or the held-out set",
                                "raise --calib-batch-size")
    return x[distributed.shard(len(x))]


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions, per channel: (B, C, ...) -> (C, 1, ...) in x's dtype.
    Accumulated in float64 over the batch shards of every rank (``toolchain.distributed``)."""
    return _per_channel(distributed.mean(x, _channel_dims(x)), x, x.dtype)


def channel_rate(spikes: torch.Tensor) -> torch.Tensor:
    """The fraction of neurons that fired, per channel: (B, C, ...) 0/1 spikes (bool, or
    floats as ``sims.torch_snn.fire`` gives them) -> (C, 1, ...) float32, exact counts."""
    return _per_channel(distributed.rate(spikes, _channel_dims(spikes)), spikes, DTYPE)


def _channel_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _per_channel(values: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).reshape((x.shape[1],) + (1,) * (x.dim() - 2))


# --------------------------------------------------------------------------- driver

def _check(method, alpha, batches, batch_size, iterations, holdout, x) -> None:
    problems = []
    if method not in METHODS:
        problems.append(f"method must be one of {METHODS}, got {method!r}")
    if not alpha > 0:
        problems.append(f"alpha must be > 0, got {alpha}")
    if min(batches, batch_size, iterations) < 1:
        problems.append("batches, batch_size and iterations must be >= 1")
    if not 0.0 <= holdout < 1.0:
        problems.append(f"holdout must be in [0, 1), got {holdout}")
    if method != "none" and len(x) < 2:
        problems.append("calibration needs at least 2 training samples")
    if problems:
        raise InputError("; ".join(problems))


def _calibrate(snn, ann, x_calib, method, alpha, batches, batch_size, iterations, holdout,
               seed, progress=False) -> tuple[SnnGraph, dict]:
    parts, hold_x = split_calibration(x_calib, holdout, batches, batch_size, seed)
    cal = [_make_batch(snn, ann, local_rows(p)) for p in parts]
    hold = _make_batch(snn, ann, local_rows(hold_x)) if len(hold_x) else None
    last = last_consumers(snn)
    schedules, layers_report = {}, {}
    # The input network's held-out readout: the first layer's "before" error and the guard's
    # "before" agreement (computed once).
    base = _readout(snn, hold) if hold is not None else None
    error = running_logit_error(base, hold.logits) \
        if hold is not None and SELECTION == "readout" else None
    spiking = sum(not layer.readout for layer in snn.layers)
    with progress_bar(spiking, f"calibrate {method}", progress, unit="layer") as bar:
        for index, layer in enumerate(snn.layers):
            if layer.readout:
                continue
            cache = _cached_currents(snn, layer, cal + ([hold] if hold else []))
            hold_currents = cache.pop() if hold else None
            sched, layers_report[layer.name] = _calibrate_layer(
                snn, index, cal, cache, hold, method, alpha, iterations, error, hold_currents)
            error = layers_report[layer.name].get("holdout_error") if SELECTION == "readout" \
                else None
            schedules[layer.name] = sched
            p = replace(neuron_params(layer, snn.timesteps, DTYPE), schedule=sched)
            for b, currents in zip(cal + ([hold] if hold else []), cache + [hold_currents]):
                if b is not hold or layer.name not in b.spikes:  # (kept: already there)
                    b.spikes[layer.name] = _spikes(snn, layer, p, b, currents)
                _free(b, last, index)
            bar.update(1)
    new = _with_schedules(snn, schedules, method)
    guard = _guard(new, hold, base)
    if guard.get("reverted"):
        new = _with_schedules(snn, {}, method, base=snn)
    details = {"batches_used": len(cal), "calib_samples": int(sum(len(p) for p in parts)),
               "holdout_samples": int(len(hold_x)), "layers": layers_report,
               "holdout": guard}
    return new, details


def _make_batch(snn: SnnGraph, ann: AnnGraph, x: np.ndarray) -> _Batch:
    logits, values = ann_forward(ann, x, record=True, dtype=DTYPE)
    targets = {}
    for layer in snn.layers:
        if not layer.readout:
            theta = torch.tensor(np.asarray(layer.threshold), dtype=DTYPE)
            theta = theta.reshape((-1,) + (1,) * (len(layer.shape) - 1))
            targets[layer.name] = torch.minimum(values[layer.name].clamp(min=0), theta)
    return _Batch(encode_input(snn.input, x, DTYPE), targets, logits, {})


def _free(b: _Batch, last: dict, index: int) -> None:
    """Drop cached spike trains that no later layer reads."""
    for name in [n for n in b.spikes if last.get(n, -1) <= index]:
        del b.spikes[name]


def _calibrate_layer(snn, index, cal, cache, hold, method, alpha, iterations, before=None,
                     hold_currents=None) -> tuple[torch.Tensor, dict]:
    """Fit one layer's schedule on the batches; keep it only if the holdout error drops.
    ``before``: the held-out error of the network as it stands (known from the previous
    layer's decision when the readout criterion is used); ``hold_currents``: the layer's
    cached input currents on the held-out batch (None: computed when needed)."""
    layer = snn.layers[index]
    p0 = neuron_params(layer, snn.timesteps, DTYPE)
    sched = p0.schedule.clone()
    fit = _ftbc_pass if method == "ftbc" else _lp_pass
    for _ in range(iterations):
        for b, currents in zip(cal, cache):
            fit(snn, layer, replace(p0, schedule=sched), b, alpha, currents)
    if hold is None:
        return sched, {"kept": True}
    score = SELECTION_ERRORS[SELECTION]
    before = score(snn, index, p0, hold, None, hold_currents) if before is None else before
    candidate: dict = {}
    after = score(snn, index, replace(p0, schedule=sched), hold, candidate, hold_currents)
    kept = after < before
    if kept and "spikes" in candidate:  # the layer's held-out output with the new schedule
        hold.spikes[layer.name] = candidate["spikes"]
    return (sched if kept else p0.schedule), {
        "kept": bool(kept), "holdout_error_before": before, "holdout_error_after": after,
        "holdout_error": min(before, after)}


def _cached_currents(snn, layer, cal: list[_Batch]) -> list[torch.Tensor | None]:
    """Each batch's input currents (T, B, *shape), computed once for all iterations when
    they fit in CURRENT_CACHE_BYTES (else None: recomputed per pass, chunk by chunk)."""
    size = snn.timesteps * sum(b.x.shape[0] for b in cal) * int(np.prod(layer.shape)) * 4
    if size > CURRENT_CACHE_BYTES:
        return [None] * len(cal)
    return [_currents(snn, layer, b, 0, snn.timesteps, input_current(layer, b.x))
            for b in cal]


# --------------------------------------------------------------------------- the updates

def _currents(snn, layer, b: _Batch, t0: int, t1: int, steady) -> torch.Tensor:
    cur = layer_currents(snn, layer, b.spikes, t0, t1, DTYPE)
    if cur is None:
        return steady.expand((t1 - t0,) + tuple(steady.shape))
    return cur if steady is None else cur.add_(steady)  # (cur: a fresh tensor)


def _ftbc_pass(snn, layer, p: NeuronParams, b: _Batch, alpha: float,
               currents: torch.Tensor | None = None) -> None:
    """One FTBC sweep t = 1..T over batch b; updates ``p.schedule`` in place (a tensor owned
    by this calibration). ``currents``: the batch's cached (T, B, *shape) input currents."""
    v = initial_membrane(p, b.x.shape[0], tuple(layer.shape))
    target = channel_mean(b.targets[layer.name])
    steady = input_current(layer, b.x) if currents is None else None
    k = snn.timesteps if currents is not None else chunk_steps(snn, layer, b.x.shape[0])
    fired = torch.empty_like(v)  # scratch: this step's spikes, 0.0 / 1.0
    for t0 in range(0, snn.timesteps, k):
        cur = currents if currents is not None else _currents(
            snn, layer, b, t0, min(t0 + k, snn.timesteps), steady)
        for i in range(cur.shape[0]):
            t = t0 + i
            base = (v + cur[i]).add_(p.bias)  # same association order as the simulator
            fire(torch.add(base, p.schedule[t], out=fired), p.theta, out=fired)
            p.schedule[t] += alpha * (target - p.theta * channel_rate(fired))
            v = base.add_(p.schedule[t])  # re-fire the step with the updated bias
            v.addcmul_(fire(v, p.theta, out=fired), p.theta, value=-1)  # reset by subtraction


def _spikes(snn, layer, p: NeuronParams, b: _Batch,
            currents: torch.Tensor | None) -> torch.Tensor:
    """The layer's (T, B, *shape) spikes on batch b, from cached currents when given."""
    if currents is None:
        return layer_output(snn, layer, b.x, b.spikes, DTYPE, p)
    v0 = initial_membrane(p, b.x.shape[0], tuple(layer.shape))
    return run_layer(p, currents, v0)[0]


def _lp_pass(snn, layer, p: NeuronParams, b: _Batch, alpha: float,
             currents: torch.Tensor | None = None) -> None:
    """SNN-Calibration bias correction: one constant shift for all steps, full step
    (``alpha`` is not used, as in SNN-Calibration)."""
    spikes = _spikes(snn, layer, p, b, currents)
    rate = channel_rate(spikes.reshape((-1,) + tuple(spikes.shape[2:])))  # over steps too
    p.schedule.add_(channel_mean(b.targets[layer.name]) - p.theta * rate)


def layer_error(snn: SnnGraph, index: int, p: NeuronParams, b: _Batch,
                keep: dict | None = None, currents: torch.Tensor | None = None) -> float:
    """E_l = (1/T) sum_t mean (abar - theta * r(t))^2, r(t) the layer's running rate."""
    layer = snn.layers[index]
    spikes = _spikes(snn, layer, p, b, currents)
    target = b.targets[layer.name]
    cum = torch.zeros_like(target)
    total = 0.0
    for t in range(snn.timesteps):
        cum += spikes[t]
        total += float(distributed.mean((target - p.theta * cum / (t + 1)) ** 2))
    return total / snn.timesteps


def readout_error(snn: SnnGraph, index: int, p: NeuronParams, b: _Batch,
                  keep: dict | None = None, currents: torch.Tensor | None = None) -> float:
    """E = (1/T) sum_t mean (v_out(t) / t - ANN logits)^2: layer ``index`` run with ``p``
    (on its cached input ``currents`` when given), downstream layers as they are in ``snn``
    (not yet calibrated), upstream from the cache. ``keep``: receives the layer's own output
    as ``keep["spikes"]``."""
    trains = dict(b.spikes)
    trains[snn.layers[index].name] = _spikes(snn, snn.layers[index], p, b, currents)
    if keep is not None:
        keep["spikes"] = trains[snn.layers[index].name]
    return running_logit_error(_readout(snn, b, trains, index + 1), b.logits)


def _readout(snn: SnnGraph, b: _Batch, trains: dict | None = None,
             start: int = 0) -> torch.Tensor:
    """The network's readout (T, B, K) on the batch's already *encoded* input (``run_network``
    takes raw samples and would normalise them a second time): layers ``start`` onwards as
    they are in ``snn``, earlier ones from ``trains`` (added to in place)."""
    trains = {} if trains is None else trains
    for layer in snn.layers[start:]:
        out = layer_output(snn, layer, b.x, trains, DTYPE)
        if layer.readout:
            return out
        trains[layer.name] = out
    raise AssertionError("the last layer is the readout")


def running_logit_error(readout: torch.Tensor, logits: torch.Tensor) -> float:
    steps = torch.arange(1, readout.shape[0] + 1, dtype=readout.dtype)
    est = readout / steps.reshape((-1,) + (1,) * (readout.dim() - 1))
    return float(distributed.mean((est - logits[None]) ** 2))


SELECTION_ERRORS = {"layer": layer_error, "readout": readout_error}
SELECTION = "readout"


# --------------------------------------------------------------------------- guard, output

def agreement(readout: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """(T,) fraction of samples whose SNN argmax after step t equals the ANN's."""
    return distributed.mean(readout.argmax(-1) == logits.argmax(-1)[None], (1,)).numpy()


def _guard(new: SnnGraph, hold: _Batch | None, old_readout: torch.Tensor | None) -> dict:
    """Held-out readout agreement with the ANN before (``old_readout``: the input network's
    held-out readout) and after; revert when it drops."""
    if hold is None:
        return {}
    before = agreement(old_readout, hold.logits)
    readout = new.readout
    after = agreement(layer_output(new, readout, hold.x, hold.spikes, DTYPE), hold.logits)
    return {"agreement_before": float(before.mean()), "agreement_after": float(after.mean()),
            "agreement_before_at_T": float(before[-1]), "agreement_after_at_T": float(after[-1]),
            "reverted": bool(after.mean() < before.mean())}


def _with_schedules(snn: SnnGraph, schedules: dict, method: str,
                    base: SnnGraph | None = None) -> SnnGraph:
    """A new graph whose layers carry ``schedules[name]`` (T, C) (zeros where absent, or the
    input graph's own schedule when ``base`` is given)."""
    layers = []
    for layer in snn.layers:
        if layer.name in schedules:
            sched = schedules[layer.name].reshape(snn.timesteps, layer.channels).double()
            sched = sched.numpy()
        elif base is not None and layer.bias_schedule is not None:
            sched = np.asarray(layer.bias_schedule)
        else:
            sched = np.zeros((snn.timesteps, layer.channels))
        layers.append(evolve(layer, bias_schedule=np.array(sched, dtype=np.float64)))
    return evolve(snn, layers=tuple(layers), meta={**snn.meta, "calibration_method": method})


def _summary(report: dict) -> dict:
    keys = ("method", "alpha", "batches", "batch_size", "iterations", "holdout_fraction",
            "seed")
    kept = {name: r.get("kept") for name, r in report.get("layers", {}).items()}
    return {**{k: report[k] for k in keys}, "kept": kept,
            "reverted": report.get("holdout", {}).get("reverted", False)}


# --------------------------------------------------------------------------- reference loop

def ftbc_full_forward(snn: SnnGraph, ann: AnnGraph, batches: list[np.ndarray], *,
                      alpha: float = 0.5, iterations: int = 1) -> SnnGraph:
    """FTBC with the authors' loop structure and the same math, for tests and benchmarks.

    For each iteration, batch, spiking layer l and step t: one full ANN forward and one step
    of the whole SNN (all layers, stateful), then ``b_l[t] += alpha * mean_c(abar - theta s)``
    and layer l's step is re-fired: L x T full-network forwards per batch, nothing cached,
    no holdout rule. With one batch and one iteration it computes what ``calibrate``
    computes with ``holdout=0`` (same loop order then)."""
    scheds = {l.name: neuron_params(l, snn.timesteps, DTYPE).schedule.clone()
              for l in snn.layers if not l.readout}
    with torch.no_grad():
        for _ in range(iterations):
            for xb in batches:
                for layer in snn.layers:
                    if not layer.readout:
                        _full_forward_layer(snn, ann, xb, layer, scheds, alpha)
    return _with_schedules(snn, scheds, "ftbc")


def _full_forward_layer(snn, ann, xb, layer, scheds, alpha) -> None:
    params = {l.name: neuron_params(l, snn.timesteps, DTYPE) for l in snn.layers}
    params.update({name: replace(params[name], schedule=s) for name, s in scheds.items()})
    x = encode_input(snn.input, xb, DTYPE)
    state = {l.name: initial_membrane(params[l.name], len(xb), tuple(l.shape))
             for l in snn.layers}
    p = replace(params[layer.name], schedule=scheds[layer.name])
    for t in range(snn.timesteps):
        _, values = ann_forward(ann, xb, record=True, dtype=DTYPE)
        target = torch.minimum(values[layer.name].clamp(min=0), p.theta)
        v_prev, cur, spikes = _network_step(snn, params, state, x, t, layer.name)
        p.schedule[t] += alpha * (channel_mean(target) - p.theta * channel_rate(spikes))
        pre = v_prev + cur + p.bias + p.schedule[t]
        state[layer.name] = pre.addcmul_(fire(pre, p.theta), p.theta, value=-1)


def _network_step(snn, params, state, x, t, watch):
    """Advance every layer by step t (in place on ``state``); return the watched layer's
    membrane before the step, its input current and its spikes (float)."""
    outs, watched = {}, None
    for layer in snn.layers:
        cur = 0
        for syn in layer.synapses:
            src = x if syn.source == INPUT else outs[syn.source]
            cur = cur + synapse_current(syn, src)
        p = params[layer.name]
        v_prev = state[layer.name]
        state[layer.name], s = layer_step(p, v_prev, cur, t)
        if not layer.readout:
            outs[layer.name] = s.to(DTYPE) * p.theta
        if layer.name == watch:
            watched = (v_prev, cur, s.to(DTYPE))
    return watched
