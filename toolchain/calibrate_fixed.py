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
    bias_mant[t, c] += rint(alpha * (target_c(t) - mean_c(s(t))) * vth[c] / 2**bias_exp)
    bias_mant[t, c]  = clip(bias_mant[t, c], target.bias_mant_min, target.bias_mant_max)
    the step is re-fired with the updated bias before moving on (as toolchain.calibrate)

(vth[c] state units = one float threshold, so ``(target - mean_c(s)) * vth`` is the float
update in state units.) With ``fit="solve"`` each step's mantissas are instead the whole
numbers within the 13-bit range whose mean rate over the batches is nearest the mean target
(``_ftbc_solve``, as the float calibration's solve). ``target_c(t)`` is the float
calibration's per-step target in spikes per step: with ``step_target="ideal"`` (the default,
``toolchain.calibrate.step_targets``) the firing of an ideal IF neuron with this layer's
v_init / vth fed abar as a constant input, shifted so that the T steps sum to T
mean_c(abar); with ``"paper"`` mean_c(abar) at every step.
The layer's ``bias_exp`` is kept:
an update that does not fit 13 bits is clipped to the limit and counted in the report
(``clamped``; with ``fit="solve"``: the step-channels whose target no mantissa in the range
reaches), so the graph stays valid for the target; nothing else changes (weights, vth,
v_init, the readout).

Selection, by the driver shared with ``toolchain.calibrate`` (``toolchain.calibration``, on
held-out *training* samples only): a layer's new mantissas are kept only if they lower the
held-out error of the network output against the ANN logits,
``E = (1/T) sum_t mean (v_out(t) / (t * scale_out) - z_ANN)^2`` (upstream as kept, downstream
not yet recalibrated); finally, if the held-out argmax agreement with the ANN
(mean over t) falls below that of the input graph, every layer is reverted.

Cost. Per layer: ``iterations * batches`` passes over the layer's T steps on its cached input
currents, plus one integer forward of the layer per batch and a downstream forward of the
held-out set for the keep rule (no L x T full-network forwards).
"""
from __future__ import annotations

import itertools
import time
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from core import distributed
from core.errors import InputError
from core.ir import AnnGraph, QLayer, QuantGraph, SnnGraph, evolve
from exporters.quantize import validate
from hw_targets import Target
from sims import engine
from sims.engine import (IntegerArithmetic, LayerPlan, bias_sweep, initial_state, input_current,
                         last_consumers, membrane, run_steps, spike_current, train_dtype)
from sims.reference import encode_input
from toolchain.ann import ann_forward
from toolchain.calibrate import ideal_current, step_targets
from toolchain.calibration import (Batch, CalibrationOptions, calibrate_layers, solve_bias,
                                   summary)

_DEFAULT = CalibrationOptions  # the defaults below are its fields' (written once, there)
CURRENT_CACHE_BYTES = 1 << 28  # cache a layer's fit currents across iterations below 256 MiB
CHUNK_ELEMENTS = 1 << 22  # uncached drives and layer outputs: steps x batch x neurons per chunk


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
                    alpha: float = _DEFAULT.alpha, batches: int = _DEFAULT.batches,
                    batch_size: int = _DEFAULT.batch_size,
                    iterations: int = _DEFAULT.iterations, holdout: float = _DEFAULT.holdout,
                    seed: int = _DEFAULT.seed, progress: bool = False, device: Any = None,
                    keep: str = _DEFAULT.keep, step_target: str = _DEFAULT.step_target,
                    fit: str = _DEFAULT.fit) -> tuple[QuantGraph, dict]:
    """Return (QuantGraph with corrected ``bias_mant``, report). ``x_calib``: training samples
    only; ``thresholds``: ``float_thresholds(converted_snn)``; ``target``: the hardware target
    ``q`` was quantized for (its 13-bit bias range bounds the mantissas); ``device``: the
    torch device (the result is the same on every device); ``keep``: the keep rule
    (``toolchain.calibration``); ``step_target``: FTBC's per-step target, as the float
    calibration's.

    The report holds the hyper-parameters, seconds, per-layer ``layers[name] = {kept,
    holdout_error_before, holdout_error_after, clamped, changed}`` and the held-out agreement
    with the ANN before/after (``holdout``); ``q.meta["fixed_calibration"]`` a summary."""
    opts = CalibrationOptions(method="ftbc", alpha=alpha, batches=batches,
                              batch_size=batch_size, iterations=iterations, holdout=holdout,
                              seed=seed, progress=progress, device=device, keep=keep,
                              step_target=step_target, fit=fit)
    opts.check(x_calib)
    _check_graph(q, thresholds, target)
    start = time.perf_counter()
    report: dict[str, Any] = {**opts.header(), "method": "ftbc-fixed", "target": target.name}
    with torch.no_grad(), engine.exact_math():
        rule = IntegerRule(q, ann, thresholds, target, opts)
        details = calibrate_layers(rule, x_calib, opts)
    new = q if details["holdout"].get("reverted") else evolve(q, layers=tuple(rule.layers))
    details["violations"] = [str(v) for v in validate(new, target)]
    report.update(details, seconds=time.perf_counter() - start)
    meta = summary(report, extra_keys=("target",), per_layer=("clamped",))
    return evolve(new, meta={**new.meta, "fixed_calibration": meta}), report


# --------------------------------------------------------------------------- checks

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


# --------------------------------------------------------------------------- the rule

class IntegerRule:
    """Integer FTBC for ``toolchain.calibration``: candidates are (layer with new mantissas,
    its plan) of the integer engine; batches carry the encoded input, the target spike rate
    per channel and the cached integer spike trains (T, B, n) uint8."""

    def __init__(self, q: QuantGraph, ann: AnnGraph, thresholds: Mapping[str, np.ndarray],
                 target: Target, opts: CalibrationOptions):
        self.graph, self.ann, self.thresholds, self.opts = q, ann, thresholds, opts
        self.target, self.label = target, "calibrate fixed point"
        self.plan = engine.compile(q, IntegerArithmetic(target), opts.device)
        self.layers, self.plans = list(q.layers), list(self.plan.layers)  # as kept

    def plan_layer(self, layer: QLayer) -> LayerPlan:
        """``layer`` (of q, or a candidate replacing one) in the target's arithmetic."""
        return engine.plan_integer_layer(layer, engine.graph_shapes(self.graph),
                                         self.plan.arithmetic, self.plan.device)

    def batch(self, x: np.ndarray) -> Batch:
        logits, values = ann_forward(self.ann, x, record=True, dtype=torch.float32)
        targets = {}
        for layer in self.graph.layers:
            if not layer.readout:
                a = values[layer.name].to(torch.float64).reshape(len(x), layer.shape[0], -1)
                theta = torch.from_numpy(np.array(self.thresholds[layer.name], np.float64))
                rate = (a / theta.reshape(1, -1, 1)).clamp(0.0, 1.0)
                if self.opts.step_target == "paper":  # the same rate at every step: (T, C)
                    targets[layer.name] = distributed.mean(rate, (0, 2)).expand(
                        self.graph.timesteps, -1).to(self.plan.device)
                    continue
                v_init = torch.from_numpy(np.asarray(layer.v_init, np.float64)
                                          / np.asarray(layer.vth, np.float64))
                current = ideal_current(self.ann, values, layer.name)
                if current is not None:
                    current = (current.to(torch.float64).reshape(a.shape)
                               / theta.reshape(1, -1, 1))
                targets[layer.name] = step_targets(  # (T, C): per-step rates
                    rate, torch.ones(1, 1, dtype=torch.float64), v_init.reshape(-1, 1),
                    self.graph.timesteps, current).reshape(self.graph.timesteps, -1).to(
                        self.plan.device)
        x_int = encode_input(self.graph.input, x, self.plan.arithmetic.payload_bits)
        dev = self.plan.device
        return Batch(torch.from_numpy(x_int.astype(np.float32)).to(dev), targets,
                     logits.to(torch.float64).to(dev), {})

    def readout(self, b: Batch, trains: dict, start: int) -> torch.Tensor:
        """Readout (T, B, K) in float logit units: layers ``start`` onwards as planned in the
        input graph, earlier ones from ``trains``; a computed train is dropped after its last
        reader (one batch's live trains at a time)."""
        last, trains = last_consumers(self.graph), dict(trains)
        for i, lp in enumerate(self.plan.layers[start:], start):
            out = layer_output(lp, b.x, trains, self.graph.timesteps)
            if lp.readout:
                return readout_float(self.graph, out)
            trains[lp.name] = out
            for name in [n for n in trains if last.get(n, -1) <= i]:
                del trains[name]
        raise AssertionError("the last layer is the readout")

    def final_readout(self, b: Batch) -> torch.Tensor:
        out = layer_output(self.plans[-1], b.x, b.spikes, self.graph.timesteps)
        return readout_float(self.graph, out)

    def fit(self, index: int, cal: list[Batch], hold: Batch | None) -> "IntegerFit":
        return IntegerFit(self, index, cal)

    def keep(self, index: int, candidate: tuple[QLayer, LayerPlan]) -> None:
        self.layers[index], self.plans[index] = candidate


class IntegerFit:
    """One integer layer: ``iterations`` FTBC sweeps over the batches on its fit drive
    (cached for all iterations when it fits CURRENT_CACHE_BYTES); the candidate is the layer
    with the new mantissas."""

    def __init__(self, rule: IntegerRule, index: int, cal: list[Batch]):
        self.rule, self.index, steps = rule, index, rule.graph.timesteps
        layer, lp = rule.graph.layers[index], rule.plans[index]
        mant = torch.from_numpy(layer.bias_mant.astype(np.float64)).to(lp.vth.device)
        limits = (float(rule.target.bias_mant_min), float(rule.target.bias_mant_max))
        cache = _fit_currents(lp, cal, steps)
        clamped = 0
        if rule.opts.fit == "solve":  # the sweeps' fixed point, found directly
            drives = [_steps(cache[i] if cache[i] is not None
                             else fit_drives(lp, b.x, b.spikes, steps), steps)
                      for i, b in enumerate(cal)]
            want = torch.stack([b.targets[layer.name] for b in cal]).mean(0)  # (T, C)
            clamped = _ftbc_solve(lp, layer, drives, want, mant, limits)
        else:
            for _ in range(rule.opts.iterations):
                for i, b in enumerate(cal):
                    cur = (cache[i] if cache[i] is not None
                           else fit_drives(lp, b.x, b.spikes, steps))
                    clamped += _ftbc_pass(lp, layer, cur, b.targets[layer.name], mant,
                                          rule.opts.alpha, limits)
        new = mant.cpu().numpy().astype(np.int64)
        candidate = evolve(layer, bias_mant=new)
        self.candidate = (candidate, rule.plan_layer(candidate))
        self.alternatives = {}
        if layer.signed:  # its constant form too (toolchain.calibration.SIGNED_FORMS)
            flat = evolve(layer, bias_mant=constant_form(new, *limits))
            self.alternatives["constant"] = (flat, rule.plan_layer(flat))
        self.entry = {"clamped": clamped,
                      "changed": int(np.count_nonzero(new != layer.bias_mant)),
                      "max_abs_change": int(np.max(np.abs(new - layer.bias_mant), initial=0))}

    def output(self, candidate: tuple[QLayer, LayerPlan] | None, b: Batch
               ) -> Iterator[torch.Tensor]:
        """The layer's integer spikes on b (None: as kept): time chunks (k, B, n) of uint8
        (int8 for a signed layer)."""
        lp = self.rule.plans[self.index] if candidate is None else candidate[1]
        dtype = train_dtype(lp, torch.uint8)
        return (c.to(dtype) for c in layer_chunks(lp, b.x, b.spikes, self.rule.graph.timesteps))


def constant_form(mant: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per-step mantissas (T, C) -> each channel's mean over the steps, rounded half to even
    and within the target's mantissa range, at every step."""
    flat = np.clip(np.rint(mant.mean(axis=0, keepdims=True)), low, high).astype(np.int64)
    return np.broadcast_to(flat, mant.shape).copy()


def _fit_currents(lp: LayerPlan, cal: list[Batch], steps: int) -> list[torch.Tensor | None]:
    """Each batch's fit drive, computed once for all iterations when it fits the budget."""
    rows = sum(b.x.shape[0] for b in cal) * (steps if lp.spiking_inputs else 1)
    if rows * lp.n * lp.vth.element_size() > CURRENT_CACHE_BYTES:
        return [None] * len(cal)
    return [fit_drive(lp, b.x, b.spikes, steps) for b in cal]


def fit_drive(lp: LayerPlan, x: torch.Tensor, trains: Mapping[str, torch.Tensor],
              steps: int) -> torch.Tensor:
    """``a << 6`` without the bias: (steps, B, n), or (B, n) when only the constant input
    feeds the layer (the same at every step)."""
    const = input_current(lp, x, steps)
    a = spike_current(lp, trains, steps, x.shape[0])
    if a is None:
        return const.mul_(lp.shift)
    return (a if const is None else a.add_(const)).mul_(lp.shift)


def fit_drives(lp: LayerPlan, x: torch.Tensor, trains: Mapping[str, torch.Tensor],
               steps: int) -> Iterator[torch.Tensor]:
    """``fit_drive`` step by step, computed in time chunks of at most CHUNK_ELEMENTS values
    (exact integers: the same values whatever the chunking)."""
    const = input_current(lp, x, steps)
    if not lp.spiking_inputs:
        drive = const.mul_(lp.shift)
        yield from [drive] * steps
        return
    k = _chunk_steps(lp, steps, x.shape[0])
    for t0 in range(0, steps, k):
        a = spike_current(lp, trains, min(k, steps - t0), x.shape[0], t0=t0)
        yield from (a if const is None else a.add_(const)).mul_(lp.shift)


def _chunk_steps(lp: LayerPlan, steps: int, batch: int) -> int:
    widest = max([int(np.prod(p.src_shape)) for p in lp.synapses] + [lp.n])
    return max(1, min(steps, CHUNK_ELEMENTS // max(1, widest * batch)))


def _steps(drive: torch.Tensor | Iterator[torch.Tensor], steps: int
           ) -> Iterator[torch.Tensor]:
    """A cached drive tensor ((T, B, n), or (B, n) at every step) or a stream of per-step
    drives (``fit_drives``), step by step."""
    if isinstance(drive, torch.Tensor):
        return (drive if drive.dim() == 2 else drive[t] for t in range(steps))
    return drive


def _ftbc_pass(lp: LayerPlan, layer, drive: torch.Tensor | Iterator[torch.Tensor],
               target: torch.Tensor, mant: torch.Tensor, alpha: float,
               limits: tuple[float, float]) -> int:
    """One integer FTBC sweep t = 1..T over a batch (``engine.bias_sweep``) on a cached
    drive tensor or a stream of per-step drives (``fit_drives``); updates ``mant`` (T, C) in
    place. Returns how many updated mantissas were clipped to the 13-bit range."""
    drives = _steps(drive, mant.shape[0])
    first = next(drives)
    drives, batch = itertools.chain([first], drives), first.shape[-2]
    state = initial_state(lp, batch)
    vth_c = torch.from_numpy(np.array(layer.vth, np.float64)).to(state.device)
    unit = float(2 ** layer.bias_exp)
    clamped = [0]

    def update(t: int, spikes: torch.Tensor) -> None:
        rate = distributed.rate(spikes.view(spikes.shape[0], lp.channels, -1), (0, 2))
        updated = mant[t] + torch.round(alpha * (target[t] - rate) * vth_c / unit)
        clamped[0] += int(((updated < limits[0]) | (updated > limits[1])).sum())
        mant[t] = updated.clamp_(*limits)

    bias_sweep(lp, drives, state, lambda t: (mant[t] * unit).to(state.dtype), update)
    return clamped[0]


def _ftbc_solve(lp: LayerPlan, layer, drives: list[Iterator[torch.Tensor]],
                want: torch.Tensor, mant: torch.Tensor, limits: tuple[float, float]) -> int:
    """Integer FTBC's fixed point, step by step (``toolchain.calibrate``'s float solve in
    mantissas, ``engine.bias_solve``): per step the whole mantissas within the 13-bit range
    where the batches' mean rate meets ``want[t]`` (the batches' mean target), by
    ``solve_bias`` from the step's current mantissa; then every batch settles the step with
    it. Updates ``mant`` (T, C) in place; returns how many step-channels could not reach
    their target within the range."""
    vth_c = torch.from_numpy(np.array(layer.vth, np.float64)).to(mant.device)
    unit, dtype = float(2 ** layer.bias_exp), lp.v_init.dtype
    width = torch.clamp(torch.round(vth_c / unit), min=1)  # one threshold, in mantissas
    low, high = torch.full_like(width, limits[0]), torch.full_like(width, limits[1])
    missed = [0]

    def solve(t: int, rate) -> torch.Tensor:  # rate(m): the batches' mean spikes per step
        mant[t], out = solve_bias(rate, want[t], mant[t].clone(), width, low, high, 1,
                                  integer=True)
        missed[0] += int(out.sum())
        return mant[t]

    engine.bias_solve(lp, drives, lambda m: (m * unit).to(dtype),
                      lambda fired: distributed.rate(fired, (0, 2)), solve)
    return missed[0]


# --------------------------------------------------------------------------- forwards

def layer_output(lp: LayerPlan, x: torch.Tensor, trains: Mapping[str, torch.Tensor],
                 steps: int) -> torch.Tensor:
    """All T steps of one layer on cached source spike trains, as ``sims.emulator`` runs
    it (bit-exact with ``sims.reference``): (T, B, n) uint8 spikes 0/1 (a signed layer: int8
    -1/0/1), or the readout membrane after each step in the layer's float dtype (exact
    integers)."""
    out = torch.empty((steps, x.shape[0], lp.n),
                      dtype=lp.dtype if lp.readout else train_dtype(lp, torch.uint8),
                      device=x.device)
    t0 = 0
    for chunk in layer_chunks(lp, x, trains, steps):
        out[t0:t0 + len(chunk)].copy_(chunk)
        t0 += len(chunk)
    return out


def layer_chunks(lp: LayerPlan, x: torch.Tensor, trains: Mapping[str, torch.Tensor],
                 steps: int) -> Iterator[torch.Tensor]:
    """``layer_output`` in time chunks of at most CHUNK_ELEMENTS values: (k, B, n) in the
    layer's float dtype, in a buffer the next chunk overwrites."""
    batch = x.shape[0]
    state = initial_state(lp, batch)
    k = _chunk_steps(lp, steps, batch)
    buffer = torch.empty((k, batch, lp.n), dtype=lp.dtype, device=state.device)
    scratch = torch.empty_like(membrane(lp, state))
    drives = fit_drives(lp, x, trains, steps)
    for t0 in range(0, steps, k):
        chunk = buffer[:min(k, steps - t0)]
        for t in range(len(chunk)):
            run_steps(lp, next(drives), state, t0 + t, chunk[t:t + 1], scratch)
        yield chunk


def readout_float(q: QuantGraph, readout: torch.Tensor) -> torch.Tensor:
    """Integer readout membrane -> float logit units (divide by the readout's scale)."""
    scale = torch.from_numpy(np.array(q.readout.scale, np.float64)).to(readout.device)
    return readout.to(torch.float64) / scale


