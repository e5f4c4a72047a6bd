"""Bias calibration of a converted SNN: ``none``, ``lp`` (SNN-Calibration light pipeline) and
``ftbc`` (Forward Temporal Bias Correction, Wu et al., ECCV 2024, Algorithm 1).

Target. For spiking layer l with threshold theta, the ANN activation it should reproduce is
``a_l`` clipped to what one step can carry: ``abar = clip(a_l, 0, theta)`` (an IF neuron's
output per step is 0 or theta). ``mean_c`` is the mean over batch and positions of channel c.

ftbc. For each layer in topological order (upstream layers already calibrated, their spike
trains cached), for each iteration and calibration batch, for t = 1..T::

    v  = v + I[t] + bias + b[t];  s(t) = v >= theta                      (as simulated)
    b[t] += alpha * (target_c(t) - theta * mean_c(s(t)))                 (paper's update form)
    the step is re-fired with the updated b[t] before moving to t + 1     (authors' code)

Per-step target (``step_target``). ``"paper"`` (``--ftbc-target paper``, the paper's
Algorithm 1): the same at every step, ``mean_c(abar)``: each step's firing rate is pulled to
the ANN's mean activation. ``"ideal"`` (the default, ``step_targets``): the firing of an
*ideal* neuron of the layer at step t: an IF neuron with the layer's threshold and v_init,
reset by subtraction, fed its ANN activation abar as a constant input (a QCFS layer: the
activation's input, ``ideal_current``), so its count after t steps is
``n_t(abar) = clip(floor((v_init theta + t abar) / theta), 0, t)``; then every step is
shifted by the same amount so that the T steps together still target the ANN's mean
activation exactly as LP does::

    target_c(t) = theta mean_c(n_t - n_{t-1}) + (mean_c(abar) - theta mean_c(n_T) / T)

Why: with v_init = theta / 2 a neuron of small activation cannot fire at step 1 and fires at
the step its charge crosses theta, so even a perfect network fires few spikes early and more
late. Pulling step 1's rate up to mean_c(abar) makes a neuron fire there that would fire later
anyway (reset by subtraction conserves its charge) and the next steps' biases are pushed down
to compensate: every step's bias absorbs this shape, not only the network's temporal error,
and on networks run at T below their quantisation levels (QCFS L = 8 at T = 2, 4) the T-step
count lost 3-10 points of validation accuracy to LP (bench/README.md, "Accuracy on residual
networks", part 4). With the ideal neuron's profile as target, b[t] corrects only the
deviation from it; summed over t the target is the paper's (and LP's).

Fit (``fit``). ``"sweep"`` (the default) is the update above, ``iterations`` passes over the
batches. ``"solve"`` (``--ftbc-fit solve``) goes straight to where those passes stop moving
b[t]: the batches' mean of ``target_c(t) - theta mean_c(s(t))`` at 0, or the spike count
nearest it (``_ftbc_solve``: per step, with the earlier steps fixed, a channel's rate does not
fall as b[t] rises, so a bisection finds it); ``alpha`` and ``iterations`` do not apply.
Three sweeps at alpha 0.5 do not get there where a layer's rate responds weakly to its bias
(bench/README.md, "Accuracy on residual networks", parts 14 and 15).

lp. One bias per channel for all steps: b += mean_c(abar - theta * rate), rate = spikes / T,
full step per batch as SNN-Calibration's bias correction does.

Never worse than plain conversion (selected on held-out *training* data only):
``x_calib`` is split (seeded) into calibration batches and a ``holdout`` fraction. A layer's
new schedule is kept only if it lowers the held-out error of the network's output::

    E = (1/T) sum_t mean (v_out(t) / t - z_ANN)^2

(the readout's running estimate of the ANN logits at every step), with upstream layers as
kept and downstream layers not yet calibrated (the driver ``toolchain.calibration``, shared
with the integer calibration; the layer-local alternative, the running-rate error of the
layer itself, rejected most corrections and measured worse on digits). Finally the
readout's held-out agreement with the ANN's argmax, averaged over t = 1..T, must not fall
below that of the input network; otherwise every schedule is reverted. The readout keeps a zero schedule (it has no threshold).

Cost. Calibrating layer l costs ``iterations * batches`` passes over layer l's T steps on its
cached input spike trains (one batched conv per chunk of steps), plus one pass per batch to
cache its own output: not L x T full-network forwards. Loop order is layer -> iteration ->
batch (each layer converges against its final upstream; the authors' iteration -> layer order
recalibrates against upstream layers that are still moving). The neuron step is
``sims.engine``'s (``bias_sweep`` for FTBC, ``run_steps`` otherwise), on ``device``.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Iterator

import numpy as np
import torch

from core import distributed
from core.ir import AnnGraph, QcfsNode, SnnGraph, evolve
from sims import engine
from sims.engine import FloatArithmetic, LayerPlan
from sims.torch_snn import (encode_input, layer_chunks, layer_drive, layer_output,
                            stream_readout)
from toolchain.ann import ann_forward
from toolchain.calibration import (Batch, CalibrationOptions, calibrate_layers, solve_bias,
                                   summary)
from toolchain.calibration import agreement, split_calibration  # noqa: F401  (public here too)

_DEFAULT = CalibrationOptions  # the defaults below are its fields' (written once, there)

DTYPE = torch.float32
TIE = 1e-5  # an activation this close (in thresholds) below a count's boundary counts as on it
CURRENT_CACHE_BYTES = 1 << 29  # cache a layer's currents across iterations below 512 MiB


# --------------------------------------------------------------------------- public API

def calibrate(snn: SnnGraph, ann: AnnGraph, x_calib: np.ndarray, *, method: str = "ftbc",
              alpha: float = _DEFAULT.alpha, batches: int = _DEFAULT.batches,
              batch_size: int = _DEFAULT.batch_size, iterations: int = _DEFAULT.iterations,
              holdout: float = _DEFAULT.holdout, seed: int = _DEFAULT.seed,
              progress: bool = False, device: Any = None, keep: str = _DEFAULT.keep,
              step_target: str = _DEFAULT.step_target, fit: str = _DEFAULT.fit
              ) -> tuple[SnnGraph, dict]:
    """Return (calibrated SnnGraph, report). ``x_calib``: training samples only.
    ``progress``: a bar over the layers on stderr; ``device``: the torch device; ``keep``:
    ``"layer"`` (each layer's correction kept only if it lowers the held-out error),
    ``"lenient"`` (kept unless it raises that error significantly: ``LENIENT_Z`` in
    ``toolchain.calibration``) or ``"network"`` (every correction kept, the final held-out
    guard only); ``step_target``: FTBC's per-step target, ``"ideal"`` (``step_targets``, the
    default) or ``"paper"`` (mean_c(abar) at every step).

    The report holds method, alpha, batches, batch_size, iterations, seconds, per-layer
    ``layers[name] = {kept, holdout_error_before, holdout_error_after}`` (E below) and the
    held-out readout agreement with the ANN before/after (``holdout``)."""
    opts = CalibrationOptions(method=method, alpha=alpha, batches=batches,
                              batch_size=batch_size, iterations=iterations, holdout=holdout,
                              seed=seed, progress=progress, device=device, keep=keep,
                              step_target=step_target, fit=fit)
    opts.check(x_calib)
    start = time.perf_counter()
    report: dict[str, Any] = opts.header()
    if method == "none":
        new = _with_schedules(snn, {}, method)
        return new, {**report, "layers": {}, "seconds": time.perf_counter() - start}
    with torch.no_grad(), engine.exact_math():
        rule = FloatRule(snn, ann, opts)
        details = calibrate_layers(rule, x_calib, opts)
    new = rule.result(details["holdout"].get("reverted", False))
    report.update(details, seconds=time.perf_counter() - start)
    return evolve(new, meta={**new.meta, "calibration": summary(report)}), report


def step_targets(abar: torch.Tensor, theta: torch.Tensor, v_init: torch.Tensor,
                 steps: int, current: torch.Tensor | None = None) -> torch.Tensor:
    """FTBC's per-step targets (T, C, 1, ...) in abar's dtype (module docstring): per step t
    the channel mean of theta (n_t - n_{t-1}), the ideal neuron's firing, shifted so that the
    steps sum to T mean_c(abar). ``abar`` (B, C, ...): clipped ANN activations in [0, theta];
    ``current``: the ideal neuron's constant input (default abar; a QCFS layer's is the
    activation's *input*: its quantised output sits exactly on count boundaries when T < L,
    where the count of the real neuron, fed the unquantised current, is decided by which side
    of the level its input lies), clipped to [0, theta]; ``theta``, ``v_init`` (fraction of
    theta): per channel, broadcastable to (C, 1, ...). Counts are computed in float64; ``TIE``
    absorbs the float rounding of an input exactly on a count boundary (the neuron fires on
    v >= theta)."""
    a, th = abar.to(torch.float64), theta.to(torch.float64)
    c = a if current is None else torch.minimum(current.to(torch.float64).clamp(min=0), th)
    v0 = v_init.to(torch.float64) * th
    per_step, previous = [], torch.zeros_like(c)
    for t in range(1, steps + 1):
        count = torch.clamp(torch.floor((v0 + t * c) / th + TIE), 0, t)
        per_step.append(channel_mean(count - previous))
        previous = count
    fired = torch.stack(per_step)  # (T, C, 1, ...) mean spikes per neuron at each step
    th_c = th.expand(fired.shape[1:])
    shift = channel_mean(a) - th_c * fired.sum(0) / steps
    return (th_c * fired + shift).to(abar.dtype)


def ideal_current(ann: AnnGraph, values: dict, name: str) -> torch.Tensor | None:
    """The constant input of ``step_targets``' ideal neuron for spiking layer ``name``: the
    input of a QCFS activation (None otherwise: the clipped activation itself)."""
    node = ann.node(name)
    return values[node.inputs[0]] if isinstance(node, QcfsNode) else None


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions, per channel: (B, C, ...) -> (C, 1, ...) in x's dtype.
    Accumulated in float64 over the batch shards of every rank (``core.distributed``)."""
    return _per_channel(distributed.mean(x, _channel_dims(x)), x, x.dtype)


def channel_rate(spikes: torch.Tensor) -> torch.Tensor:
    """The fraction of neurons that fired, per channel: (B, C, ...) 0/1 spikes (bool, or
    floats as the engine gives them) -> (C, 1, ...) float32, exact counts."""
    return _per_channel(distributed.rate(spikes, _channel_dims(spikes)), spikes, DTYPE)


def _channel_dims(x: torch.Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _per_channel(values: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).reshape((x.shape[1],) + (1,) * (x.dim() - 2))


# --------------------------------------------------------------------------- the rule

class FloatRule:
    """Float FTBC / LP for ``toolchain.calibration``: candidates are bias schedules (T, C, 1)
    of the float engine; batches carry the per-channel means of the clipped ANN activations
    ``abar`` as targets (``channel_mean``: all the updates use; the activations are dropped)."""

    def __init__(self, snn: SnnGraph, ann: AnnGraph, opts: CalibrationOptions):
        self.graph, self.ann, self.opts = snn, ann, opts
        self.label = f"calibrate {opts.method}"
        self.arith = FloatArithmetic(DTYPE)
        self.plan = engine.compile(snn, self.arith, opts.device)
        self.layers = list(self.plan.layers)  # as kept
        self.schedules: dict[str, torch.Tensor] = {}

    def batch(self, x: np.ndarray) -> Batch:
        logits, values = ann_forward(self.ann, x, record=True, dtype=DTYPE)
        dev, targets = self.plan.device, {}
        for layer in self.graph.layers:
            if not layer.readout:
                theta = torch.tensor(np.asarray(layer.threshold), dtype=DTYPE)
                theta = theta.reshape((-1,) + (1,) * (len(layer.shape) - 1))
                abar = torch.minimum(values[layer.name].clamp(min=0), theta).to(dev)
                if self.opts.method == "ftbc" and self.opts.step_target == "ideal":
                    # (T, C, 1, ...): all the updates read of it
                    v_init = torch.tensor(np.asarray(layer.v_init), dtype=DTYPE)
                    v_init = v_init.reshape((-1,) + (1,) * (theta.dim() - 1))
                    targets[layer.name] = step_targets(
                        abar, theta.to(dev), v_init.to(dev), self.graph.timesteps,
                        ideal_current(self.ann, values, layer.name))
                else:
                    targets[layer.name] = channel_mean(abar)
        return Batch(encode_input(self.graph.input, x, DTYPE, dev), targets, logits.to(dev), {})

    def readout(self, b: Batch, trains: dict, start: int) -> torch.Tensor:
        """The readout (T, B, K) on the batch's already *encoded* input: layers ``start``
        onwards as they are in the input graph, earlier ones from ``trains``; streamed in time
        chunks (``sims.torch_snn.stream_readout``: no layer's whole spike train is held)."""
        return stream_readout(self.plan, b.x, self.graph.timesteps, trains, start)

    def final_readout(self, b: Batch) -> torch.Tensor:
        """The calibrated graph's readout (its schedule is zeros) on the cached trains."""
        lp = self.plan.layers[-1]
        lp = replace(lp, schedule=torch.zeros_like(lp.schedule))
        return layer_output(lp, b.x, b.spikes, self.graph.timesteps)

    def fit(self, index: int, cal: list[Batch], hold: Batch | None) -> "FloatFit":
        return FloatFit(self, index, cal, hold)

    def keep(self, index: int, candidate: torch.Tensor) -> None:
        self.layers[index] = replace(self.layers[index], schedule=candidate)

    def result(self, reverted: bool) -> SnnGraph:
        if reverted:
            return _with_schedules(self.graph, {}, self.opts.method, base=self.graph)
        schedules = {lp.name: lp.schedule for lp in self.layers if not lp.readout}
        return _with_schedules(self.graph, schedules, self.opts.method)


class FloatFit:
    """One float layer: its input currents cached per batch (all iterations) when they fit
    CURRENT_CACHE_BYTES, then ``iterations`` FTBC or LP passes over the batches."""

    def __init__(self, rule: FloatRule, index: int, cal: list[Batch], hold: Batch | None):
        self.rule, self.index, self.steps = rule, index, rule.graph.timesteps
        self.lp = rule.layers[index]
        self.currents = _cached_currents(self.lp, cal + ([hold] if hold else []), self.steps)
        sched = self.lp.schedule.clone()
        p = replace(self.lp, schedule=sched)
        if rule.opts.method == "ftbc" and rule.opts.fit == "solve":
            _ftbc_solve(self, p, cal)  # the sweeps' fixed point, found directly
        else:
            fit = _ftbc_pass if rule.opts.method == "ftbc" else _lp_pass
            for _ in range(rule.opts.iterations):
                for b in cal:
                    fit(self, p, b)
        self.candidate, self.entry = sched, {}
        # a signed layer's FTBC schedule may also be kept in its constant form (SIGNED_FORMS)
        self.alternatives = {"constant": sched.mean(0, keepdim=True).expand_as(sched).clone()} \
            if rule.opts.method == "ftbc" and self.lp.signed else {}

    def output(self, candidate: torch.Tensor | None, b: Batch) -> Iterator[torch.Tensor]:
        """The layer's spikes on b (``candidate``: a schedule; None: as kept), one time chunk
        (k, B, n) of 0.0 / 1.0 after the other (``sims.torch_snn.layer_chunks``), from the
        cached currents when there are any."""
        lp = self.rule.layers[self.index]
        return self.chunks(lp if candidate is None else replace(lp, schedule=candidate), b)

    def chunks(self, lp: LayerPlan, b: Batch) -> Iterator[torch.Tensor]:
        currents = self.currents.get(id(b))
        if currents is None:
            yield from layer_chunks(lp, b.x, b.spikes, self.steps)
            return
        state = engine.initial_state(lp, b.x.shape[0])
        scratch = torch.empty_like(engine.membrane(lp, state))
        k = engine.float_chunk_steps(lp, self.steps, b.x.shape[0])
        buffer = torch.empty((k,) + tuple(scratch.shape), dtype=lp.dtype, device=state.device)
        for t0 in range(0, self.steps, k):
            t1 = min(t0 + k, self.steps)
            drive = currents if currents.dim() == 2 else currents[t0:t1]
            engine.run_steps(lp, drive, state, t0, buffer[:t1 - t0], scratch)
            yield buffer[:t1 - t0]

    def drives(self, b: Batch):
        """Per step the (B, n) current of the layer on batch b."""
        currents = self.currents.get(id(b))
        if currents is not None:
            yield from (currents if currents.dim() == 3 else [currents] * self.steps)
            return
        steady = engine.input_current(self.lp, b.x)
        k = engine.float_chunk_steps(self.lp, self.steps, b.x.shape[0])
        for t0 in range(0, self.steps, k):
            cur = layer_drive(self.lp, b.x, b.spikes, t0, min(t0 + k, self.steps), steady)
            yield from (cur if cur.dim() == 3 else [cur] * (min(t0 + k, self.steps) - t0))


def _cached_currents(lp: LayerPlan, batches: list[Batch], steps: int) -> dict:
    """Each batch's input currents (T, B, n) (or (B, n), the same at every step), computed
    once for all iterations when they fit in CURRENT_CACHE_BYTES (else none: recomputed per
    pass, chunk by chunk)."""
    size = steps * sum(b.x.shape[0] for b in batches) * lp.n * 4
    if size > CURRENT_CACHE_BYTES:
        return {}
    return {id(b): layer_drive(lp, b.x, b.spikes, 0, steps, engine.input_current(lp, b.x))
            for b in batches}


# --------------------------------------------------------------------------- the updates

def _ftbc_pass(fit: FloatFit, p: LayerPlan, b: Batch) -> None:
    """One FTBC sweep t = 1..T over batch b (``engine.bias_sweep``); updates ``p.schedule``
    in place (a tensor owned by this calibration)."""
    state = engine.initial_state(p, b.x.shape[0])
    # (T, C, 1): ``step_targets``, or the paper's one target (1, C, 1) for every step
    target = b.targets[p.name].reshape(-1, p.channels, 1)
    target = target.expand(len(p.schedule), -1, -1)
    theta = _theta(p)
    alpha = fit.rule.opts.alpha

    def update(t: int, fired: torch.Tensor) -> None:
        rate = channel_rate(fired.view(fired.shape[0], p.channels, -1))
        p.schedule[t] += alpha * (target[t] - theta * rate)

    engine.bias_sweep(p, fit.drives(b), state, lambda t: p.schedule[t], update)


def _ftbc_solve(fit: FloatFit, p: LayerPlan, cal: list[Batch]) -> None:
    """FTBC's fixed point, solved step by step instead of approached by ``alpha`` steps: the
    sweeps stop moving b[t] when the batches' mean of ``target[t] - theta * rate(t)`` is 0
    (every batch charged with the biases of steps < t, as the sweeps leave them). With the
    earlier steps fixed a channel's mean rate at step t does not decrease as b[t] rises (the
    neuron is compared after adding it; a signed neuron takes back less), so b[t] is found
    per channel by bisection (``toolchain.calibration.solve_bias``). Then every batch settles
    step t with it, and step t + 1 follows (``engine.bias_solve``). ``iterations`` and
    ``alpha`` do not apply."""
    steps = len(p.schedule)
    theta = _theta(p).reshape(p.channels)
    want = torch.stack([b.targets[p.name].reshape(-1, p.channels).expand(steps, -1)
                        for b in cal]).mean(0)  # (T, C): the batches' mean target
    reach = SOLVE_RANGE * theta

    def solve(t: int, rate) -> torch.Tensor:  # rate(b): the batches' mean theta * rate(t)
        start = p.schedule[t].reshape(p.channels).clone()
        bias, _ = solve_bias(rate, want[t], start, theta.clone(), start - reach, start + reach,
                             SOLVE_TOLERANCE * theta)
        p.schedule[t] = bias.view_as(p.schedule[t])
        return bias

    engine.bias_solve(p, [fit.drives(b) for b in cal], lambda bias: bias,
                      lambda fired: channel_rate(fired).reshape(p.channels), solve, theta)


SOLVE_RANGE = 2.0 ** 20  # the float solve tries biases within this many thresholds of the
SOLVE_TOLERANCE = 2.0 ** -20  # step's start, and stops at a bracket this fraction of theta


def _lp_pass(fit: FloatFit, p: LayerPlan, b: Batch) -> None:
    """SNN-Calibration bias correction: one constant shift for all steps, full step
    (``alpha`` is not used, as in SNN-Calibration)."""
    counts, rows = torch.zeros(p.channels, dtype=torch.int64, device=p.vth.device), 0
    for chunk in fit.chunks(p, b):  # spikes over all steps, counted chunk by chunk
        view = chunk.view(-1, p.channels, p.n // p.channels)
        counts += view.sum(dim=(0, 2), dtype=torch.float64).to(torch.int64)  # exact
        rows += view.shape[0]
    rate = distributed.rate_of_counts(counts, rows * (p.n // p.channels)).to(DTYPE)
    target = b.targets[p.name].reshape(p.channels, 1)
    shift = target - _theta(p).reshape(p.channels, 1) * rate.reshape(p.channels, 1)
    p.schedule.add_(shift)


def _theta(p: LayerPlan) -> torch.Tensor:
    """(C, 1) per-channel thresholds of a float layer plan."""
    return engine.channel_thresholds(p)


# --------------------------------------------------------------------------- output

def _with_schedules(snn: SnnGraph, schedules: dict, method: str,
                    base: SnnGraph | None = None) -> SnnGraph:
    """A new graph whose layers carry ``schedules[name]`` (T, C) (zeros where absent, or the
    input graph's own schedule when ``base`` is given)."""
    layers = []
    for layer in snn.layers:
        if layer.name in schedules:
            sched = schedules[layer.name].reshape(snn.timesteps, layer.channels).double()
            sched = sched.cpu().numpy()
        elif base is not None and layer.bias_schedule is not None:
            sched = np.asarray(layer.bias_schedule)
        else:
            sched = np.zeros((snn.timesteps, layer.channels))
        layers.append(evolve(layer, bias_schedule=np.array(sched, dtype=np.float64)))
    return evolve(snn, layers=tuple(layers), meta={**snn.meta, "calibration_method": method})
