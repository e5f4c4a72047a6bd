"""The layer-by-layer calibration driver shared by float FTBC / LP (``toolchain.calibrate``) and
integer FTBC (``toolchain.calibrate_fixed``); the update rule is the only difference.

For each spiking layer in topological order (upstream layers as kept, their spike trains
cached per batch, bit-packed on disk: ``DiskTrain``): the rule fits a candidate on the calibration batches; the candidate is kept
only if it lowers the held-out error of the network's output against the ANN logits::

    E = (1/T) sum_t mean (readout(t) / t - z_ANN)^2

(the readout's running estimate of the logits at every step, upstream as kept, downstream not
yet calibrated); then every batch caches the layer's output as kept. Finally, if the
held-out argmax agreement with the ANN (mean over t) falls below that of the input network,
every layer is reverted (``_guard``). Held-out samples are *training* samples: nothing is
selected on test data.

``keep = "lenient"`` turns the per-layer test's burden of proof around: a layer's candidate
is kept unless it raises the held-out error *significantly*, by more than ``LENIENT_Z``
standard errors of the paired per-image difference (each held-out image's E with the
candidate minus its E as the network stands). The fit is made to lower the error, so on 160
held-out images a small rise is more likely noise than harm; a large one (a correction that
the not yet calibrated downstream layers turn against the output) still reverts the layer.

``keep = "network"`` drops the per-layer test: every layer's candidate is kept (as the authors'
algorithm does) and only the final guard can revert them all. On a deep network the per-layer
test is noisy (it scores a layer's correction through downstream layers that are not yet
calibrated and carry most of the error): on the CIFAR-10 ResNet-20 it kept 4 of 19 FTBC
corrections at T = 4 (bench/README.md, "Accuracy on residual networks").

A rule (``Rule``) supplies the batches, the network's readout from a layer onwards, the fit
of one layer (``LayerFit``), how a kept candidate is stored, and the resulting graph.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol

import numpy as np
import torch

from core import distributed
from core.errors import InputError
from sims.engine import last_consumers
from sims.progress import progress_bar

METHODS = ("none", "lp", "ftbc")
KEEP_RULES = ("layer", "lenient", "network")
LENIENT_Z = 2.0  # keep = "lenient": revert only above this paired t statistic of the rise
# The forms of an FTBC candidate for a signed layer, chosen between by the held-out rule: the
# fitted per-step schedule, or its constant form (each channel's mean over the steps). A
# signed neuron takes back its own early over-firing, and a per-step bias fitted to channel
# means can work against that (bench/README.md, "Accuracy on residual networks", part 9).
SIGNED_FORMS = ("per-step", "constant")
FIRST_FORM = SIGNED_FORMS[0]  # the name of every fit's own candidate
STEP_TARGETS = ("ideal", "paper")  # FTBC's per-step target (toolchain.calibrate.step_targets)
FITS = ("sweep", "solve")  # FTBC's fit: the paper's alpha steps, or their fixed point solved


@dataclass(frozen=True)
class CalibrationOptions:
    """The hyper-parameters of one calibration (report order)."""
    method: str = "ftbc"
    alpha: float = 0.5
    batches: int = 5
    batch_size: int = 128
    iterations: int = 3
    holdout: float = 0.2
    seed: int = 0
    progress: bool = False
    device: Any = None
    keep: str = "layer"  # KEEP_RULES: per-layer held-out test (strict or lenient), or the
    #                      final guard only
    step_target: str = "ideal"  # STEP_TARGETS: the ideal neuron's, or the paper's flat target
    fit: str = "sweep"  # FITS

    def header(self) -> dict[str, Any]:
        """The report's leading fields."""
        return {"method": self.method, "alpha": float(self.alpha), "batches": self.batches,
                "batch_size": self.batch_size, "iterations": self.iterations,
                "holdout_fraction": float(self.holdout), "seed": self.seed,
                "keep_rule": self.keep, "step_target": self.step_target, "fit": self.fit}

    def check(self, x: np.ndarray, methods: tuple[str, ...] = METHODS) -> None:
        """InputError naming every bad option at once."""
        problems = []
        if self.method not in methods:
            problems.append(f"method must be one of {methods}, got {self.method!r}")
        if not self.alpha > 0:
            problems.append(f"alpha must be > 0, got {self.alpha}")
        if min(self.batches, self.batch_size, self.iterations) < 1:
            problems.append("batches, batch_size and iterations must be >= 1")
        if self.keep not in KEEP_RULES:
            problems.append(f"keep rule must be one of {KEEP_RULES}, got {self.keep!r}")
        if self.step_target not in STEP_TARGETS:
            problems.append(f"step target must be one of {STEP_TARGETS}, "
                            f"got {self.step_target!r}")
        if self.fit not in FITS:
            problems.append(f"fit must be one of {FITS}, got {self.fit!r}")
        if not 0.0 <= self.holdout < 1.0:
            problems.append(f"holdout must be in [0, 1), got {self.holdout}")
        if self.method != "none" and len(x) < 2:
            problems.append("calibration needs at least 2 training samples")
        if problems:
            raise InputError("; ".join(problems))


@dataclass(frozen=True, eq=False)
class Batch:
    """A calibration (or held-out) batch: encoded input, per spiking layer the rule's target,
    the ANN logits, and the cached outputs of calibrated layers (filled layer by layer)."""
    x: torch.Tensor
    targets: dict
    logits: torch.Tensor
    spikes: dict


class LayerFit(Protocol):
    """One layer's fit: ``candidate`` (whatever the rule keeps), ``entry`` (report fields that
    precede ``kept``), and the layer's output on a batch for a candidate (None: as it is): its
    (T, B, ...) 0/1 spikes, or their consecutive time chunks (``DiskTrain`` takes either).
    ``alternatives``: other forms of the candidate, by name, for the held-out rule to choose
    from (``SIGNED_FORMS``); empty for most fits."""
    candidate: Any
    entry: dict
    alternatives: Mapping[str, Any]

    def output(self, candidate: Any, b: Batch) -> torch.Tensor | Iterable[torch.Tensor]: ...


class Rule(Protocol):
    """What differs between the float and the integer calibration."""
    graph: Any
    label: str

    def batch(self, x: np.ndarray) -> Batch: ...

    def readout(self, b: Batch, trains: dict, start: int) -> torch.Tensor: ...

    def final_readout(self, b: Batch) -> torch.Tensor: ...

    def fit(self, index: int, cal: list[Batch], hold: Batch | None) -> LayerFit: ...

    def keep(self, index: int, candidate: Any) -> None: ...


# --------------------------------------------------------------------------- spike cache

class DiskTrain:
    """A cached (T, B, *shape) spike train kept bit-packed in an anonymous
    temporary file (removed when the object goes), one packed row per step: the calibration
    keeps the outputs of calibrated layers for every batch, and held in memory they would grow
    with the calibration set and T (VGG-16 at T = 64: gigabytes). ``train[t0:t1]`` reads and
    unpacks those steps only, as a tensor on the train's device; the values are exactly the
    ones cached. 0/1 trains (bool or uint8) take one bit per spike; a signed layer's int8
    -1/0/1 train two (a plane of the +1 spikes, then one of the -1 spikes)."""

    def __init__(self, train: torch.Tensor | Iterable[torch.Tensor], signed: bool = False):
        """``train``: the whole (T, B, *shape) tensor, or its consecutive time chunks (k, B, ...)
        of 0/1 values (floats are stored as bool; each chunk is written before the next is
        asked for, so a scratch buffer reused across chunks is fine); ``signed``: -1/0/1
        values, read back as int8."""
        chunks = [train] if isinstance(train, torch.Tensor) else train
        self.shape, steps = None, 0
        try:
            self.file = tempfile.TemporaryFile()
            for chunk in chunks:
                if self.shape is None:
                    self.dtype = (torch.int8 if signed else
                                  torch.uint8 if chunk.dtype == torch.uint8 else torch.bool)
                    self.device, self.shape = chunk.device, tuple(chunk.shape[1:])
                    self.row = int(np.prod(self.shape, dtype=np.int64))
                    self.planes = 2 if self.dtype == torch.int8 else 1
                    self.stride = (self.planes * self.row + 7) // 8
                flat = chunk.reshape(len(chunk), self.row)
                step = max(1, (1 << 24) // max(self.row, 1))  # ~16 MB unpacked per write
                for t0 in range(0, len(flat), step):
                    part = flat[t0:t0 + step].cpu().numpy()
                    bits = (np.concatenate((part > 0, part < 0), axis=1) if self.planes == 2
                            else part.astype(bool, copy=False))
                    self.file.write(np.packbits(bits, axis=1).tobytes())
                steps += len(chunk)
            self.file.flush()
        except OSError as exc:
            raise InputError(
                f"cannot cache calibration spike trains in the temporary directory "
                f"{tempfile.gettempdir()}: {exc.strerror or exc}; free space there or set "
                f"TMPDIR to a directory on a larger disk") from None
        if self.shape is None:
            raise ValueError("DiskTrain: no steps to cache")
        self.shape = (steps,) + self.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> torch.Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a DiskTrain is read by a slice of steps")
        t0, t1, _ = key.indices(self.shape[0])
        t1 = max(t0, t1)
        raw = os.pread(self.file.fileno(), (t1 - t0) * self.stride, t0 * self.stride)
        bits = np.unpackbits(np.frombuffer(raw, np.uint8).reshape(t1 - t0, self.stride),
                             axis=1, count=self.planes * self.row)
        if self.planes == 2:
            bits = bits[:, :self.row].view(np.int8) - bits[:, self.row:].view(np.int8)
        out = torch.from_numpy(bits)
        out = out.view(torch.bool) if self.dtype == torch.bool else out.to(self.dtype)
        return out.reshape((t1 - t0,) + self.shape[1:]).to(self.device)


# --------------------------------------------------------------------------- data

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


def running_logit_error(readout: torch.Tensor, logits: torch.Tensor) -> float:
    """E (module docstring) of a readout (T, B, K) against the ANN logits (B, K)."""
    return float(distributed.mean(_squared_errors(readout, logits)))


def image_errors(readout: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(B,) float64: each sample's E (this rank's samples; their mean over every rank is
    ``running_logit_error`` up to float rounding)."""
    return _squared_errors(readout, logits).mean(dim=(0, 2), dtype=torch.float64)


def _squared_errors(readout: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(T, B, K): (readout(t) / t - z_ANN)^2."""
    steps = torch.arange(1, readout.shape[0] + 1, dtype=readout.dtype, device=readout.device)
    est = readout / steps.reshape((-1,) + (1,) * (readout.dim() - 1))
    return (est - logits[None]) ** 2


def paired_t(after: torch.Tensor, before: torch.Tensor) -> float:
    """The paired t statistic of the rise ``after - before`` (per-sample errors, (B,) on each
    rank): mean over the standard error of the mean, over every rank's samples; 0 when the two
    are equal on every sample, +-inf when they differ by the same amount on every one."""
    d = (after - before).to(torch.float64)
    n = distributed.sum_int(int(d.numel()))
    mean, square = float(distributed.mean(d)), float(distributed.mean(d * d))
    var = max(square - mean * mean, 0.0) * n / max(n - 1, 1)
    if var == 0.0:
        return 0.0 if mean == 0.0 else float(np.copysign(np.inf, mean))
    return mean / float(np.sqrt(var / n))


def agreement(readout: torch.Tensor, logits: torch.Tensor) -> np.ndarray:
    """(T,) fraction of samples whose SNN argmax after step t equals the ANN's."""
    return distributed.mean(readout.argmax(-1) == logits.argmax(-1)[None], (1,)).cpu().numpy()


# --------------------------------------------------------------------------- the driver

def solve_bias(rate: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
               start: torch.Tensor, width: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
               resolution: float | torch.Tensor, integer: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """FTBC's fixed point for one step (``fit="solve"``): per channel a bias b in [low, high]
    where the mean rate ``rate(b)`` (C,), a nondecreasing step function, meets ``target``
    (C,), searched from ``start`` (the bias as the earlier steps left it).

    A target the rate cannot reach in [low, high] is moved to the nearest rate it can (so a
    channel that must not fire stops just below its first spike, where the sweeps stop too).
    The bracket lo < hi, rate(lo) below and rate(hi) at or above the target (the target itself
    counts on the side ``start`` lies, so a flat stretch at the target ends where the sweeps
    would stop in it), is widened from ``width`` by doubling, then halved until it is no
    wider than ``resolution`` (``integer``: whole numbers, resolution 1) or, in floats, no
    number lies between its ends. Of its two ends the one whose rate is nearer the target is
    returned, with a (C,) bool of the channels whose target was out of reach."""
    reachable = torch.minimum(torch.maximum(target, rate(low)), rate(high))
    above = rate(start) > reachable  # the sweeps would lower these channels' bias

    def too_high(b: torch.Tensor) -> torch.Tensor:
        e = rate(b) - reachable
        return torch.where(above, e > 0, e >= 0)

    lo, hi = start.clone(), start.clone()
    while True:  # ends at the bounds at the latest (the target is reachable there)
        lo = torch.where(above, torch.maximum(start - width, low), lo)
        hi = torch.where(above, hi, torch.minimum(start + width, high))
        open_ = torch.where(above, too_high(lo) & (lo > low), ~too_high(hi) & (hi < high))
        if not bool(open_.any()):
            break
        width = torch.where(open_, 2 * width, width)
    while True:  # (a float bracket also ends when no number lies between its ends)
        mid = torch.floor((lo + hi) / 2) if integer else (lo + hi) / 2
        split = ((hi - lo) > resolution) & (lo < mid) & (mid < hi)
        if not bool(split.any()):
            break
        high_ = too_high(mid)
        hi = torch.where(split & high_, mid, hi)
        lo = torch.where(split & ~high_, mid, lo)
    nearer = (rate(hi) - reachable).abs() < (rate(lo) - reachable).abs()
    return torch.where(nearer, hi, lo), reachable != target


def calibrate_layers(rule: Rule, x_calib: np.ndarray, opts: CalibrationOptions) -> dict:
    """Run the layer loop; returns the report's details (batches, per-layer entries, the
    held-out guard). The rule has kept what it kept; ``details["holdout"]["reverted"]``
    tells the caller to return the input graph instead."""
    parts, hold_x = split_calibration(x_calib, opts.holdout, opts.batches, opts.batch_size,
                                      opts.seed)
    cal = [rule.batch(local_rows(p)) for p in parts]
    hold = rule.batch(local_rows(hold_x)) if len(hold_x) else None
    # The input network's held-out readout: the first layer's "before" error and the guard's
    # "before" agreement (computed once).
    base = rule.readout(hold, {}, 0) if hold is not None else None
    error = running_logit_error(base, hold.logits) if hold is not None else None
    # keep = "lenient": each held-out sample's error as the network stands, too
    images = image_errors(base, hold.logits) if hold is not None and opts.keep == "lenient" \
        else None
    last, layers = last_consumers(rule.graph), rule.graph.layers
    report: dict[str, dict] = {}
    spiking = sum(not layer.readout for layer in layers)
    with progress_bar(spiking, rule.label, opts.progress, unit="layer") as bar:
        for index, layer in enumerate(layers):
            if layer.readout:
                continue
            report[layer.name], images = _calibrate_layer(rule, index, cal, hold,
                                                          (error, images), opts.keep)
            error = report[layer.name].get("holdout_error")
            for b in cal + ([hold] if hold else []):
                _free(b, last, index)
            bar.update(1)
    return {"batches_used": len(cal), "calib_samples": int(sum(len(p) for p in parts)),
            "holdout_samples": int(len(hold_x)), "layers": report,
            "holdout": _guard(rule, hold, base)}


def _calibrate_layer(rule: Rule, index: int, cal: list[Batch], hold: Batch | None,
                     standing: tuple[float | None, torch.Tensor | None], keep: str = "layer"
                     ) -> tuple[dict, torch.Tensor | None]:
    """Fit one layer; keep the candidate if the held-out error drops (``keep = "lenient"``:
    unless it rises significantly, ``LENIENT_Z``; ``"network"``: always); cache the layer's
    output as kept on every batch. ``standing``: the held-out error of the network as it
    stands, and (lenient) each held-out sample's; returns the report entry and the per-sample
    errors as the network now stands."""
    name, signed = rule.graph.layers[index].name, rule.graph.layers[index].signed
    before, images = standing
    fit = rule.fit(index, cal, hold)
    if hold is None or keep == "network":
        rule.keep(index, fit.candidate)
        entry = {**fit.entry, "kept": True}
    else:
        # the candidate and its other forms, each scored on the held-out readout; the best
        # is kept if it beats the network as it stands
        forms, scored = {FIRST_FORM: fit.candidate, **fit.alternatives}, {}
        for form, candidate in forms.items():
            out = DiskTrain(fit.output(candidate, hold), signed)
            readout = rule.readout(hold, {**hold.spikes, name: out}, index + 1)
            scored[form] = (running_logit_error(readout, hold.logits), out,
                            image_errors(readout, hold.logits) if images is not None else None)
        form = min(scored, key=lambda f: scored[f][0])  # the first form on a tie
        after, out, after_images = scored[form]
        entry = {**fit.entry}
        if images is None:
            kept = after < before
        else:
            t = paired_t(after_images, images)
            kept = after < before or t <= LENIENT_Z
            entry["holdout_t"] = t
        if kept:
            rule.keep(index, forms[form])
            hold.spikes[name] = out
            images = after_images
        entry.update(kept=bool(kept), holdout_error_before=before, holdout_error_after=after,
                     holdout_error=after if kept else before)
        if fit.alternatives:
            entry.update(form=form,
                         holdout_error_forms={f: e for f, (e, *_) in scored.items()})
    for b in cal + ([hold] if hold else []):
        if name not in b.spikes:
            b.spikes[name] = DiskTrain(fit.output(None, b), signed)
    return entry, images


def _free(b: Batch, last: Mapping[str, int], index: int) -> None:
    """Drop cached outputs that no later layer reads."""
    for name in [n for n in b.spikes if last.get(n, -1) <= index]:
        del b.spikes[name]


def _guard(rule: Rule, hold: Batch | None, old_readout: torch.Tensor | None) -> dict:
    """Held-out readout agreement with the ANN before (``old_readout``: the input network's
    held-out readout) and after; revert when it drops."""
    if hold is None:
        return {}
    before = agreement(old_readout, hold.logits)
    after = agreement(rule.final_readout(hold), hold.logits)
    return {"agreement_before": float(before.mean()), "agreement_after": float(after.mean()),
            "agreement_before_at_T": float(before[-1]), "agreement_after_at_T": float(after[-1]),
            "reverted": bool(after.mean() < before.mean())}


def summary(report: dict, extra_keys: tuple[str, ...] = (),
            per_layer: tuple[str, ...] = ()) -> dict:
    """The graph's meta record of a calibration: options, kept per layer (and the rule's
    ``per_layer`` counts), reverted."""
    keys = ("method", "alpha", "batches", "batch_size", "iterations", "holdout_fraction",
            "seed", "keep_rule", "step_target", "fit") + extra_keys
    layers = report.get("layers", {})
    out = {**{k: report[k] for k in keys},
           "kept": {name: r.get("kept") for name, r in layers.items()}}
    for key in per_layer:
        out[key] = {name: r.get(key, 0) for name, r in layers.items()}
    return {**out, "reverted": report.get("holdout", {}).get("reverted", False)}
