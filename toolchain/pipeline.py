"""The pipeline: one literal list of stages, each a small function ``Run -> Run``.

``Run`` is a frozen record of everything produced so far (graphs, accuracies, timings); a
stage returns a new one with its fields filled. The stage order is ``STAGES`` below; a stage
that does not apply to the chosen target returns the run unchanged. This module and the CLI
are the only ones that reach into every package.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from core import distributed
from core.errors import InputError
from core.ir import AnnGraph, QuantGraph, SnnGraph, graphs_equal
from toolchain.calibration import CalibrationOptions


def default_workers() -> int:
    """Lava verification workers by default: the cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@dataclass(frozen=True)
class Options:
    """Everything the user chose (the CLI's arguments, validated)."""
    model: Path
    target: str = "loihi2-sim"
    data: str = "digits"
    out: Path | None = None
    input_shape: tuple[int, ...] | None = None
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    timesteps: int = 16
    threshold: str = "mse"
    percentile: float = 99.99
    threshold_scale: tuple[float, ...] = (1.0,)  # several (or several keep rules): select
    v_init: float | None = None
    input_shift: bool | None = None
    neuron: str = "if"
    # the calibration's defaults are the library's (CalibrationOptions), written once
    alpha: float = CalibrationOptions.alpha
    calib_batches: int = CalibrationOptions.batches
    calib_batch_size: int = CalibrationOptions.batch_size
    iterations: int = CalibrationOptions.iterations
    holdout: float = CalibrationOptions.holdout
    keep_rule: tuple[str, ...] = (CalibrationOptions.keep,)  # several: select keeps one
    ftbc_target: str = CalibrationOptions.step_target
    ftbc_fit: str = CalibrationOptions.fit
    calibrate_fixed: bool = True
    baselines: bool = True  # also calibrate and score none and LP beside FTBC
    eval_samples: int | None = None
    verify_samples: int = 100
    verify_workers: int = field(default_factory=default_workers)
    seed: int = CalibrationOptions.seed
    progress: bool = True
    device: str = "cpu"  # torch device of the simulations and calibrations: cpu|cuda|auto
    resume: bool = False  # keep checkpoints in OUT/.ftbc-resume and continue from them
    command_line: str = ""

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("build") / self.model.stem


@dataclass(frozen=True)
class Run:
    """What the stages have produced so far. Fields stay None until their stage ran."""
    options: Options
    data: Any = None
    calib: np.ndarray | None = None
    loaded: Any = None
    ann: AnnGraph | None = None
    snn: Mapping[str, SnnGraph] = field(default_factory=dict)
    normalized: SnnGraph | None = None
    quant: QuantGraph | None = None
    results: Mapping[str, Any] = field(default_factory=dict)
    ann_labels: np.ndarray | None = None  # the ANN's top-1 on the whole evaluation split
    activity: Mapping[str, Any] | None = None  # per-neuron spikes of the emulate stage
    timings: Mapping[str, float] = field(default_factory=dict)
    peak_rss: Mapping[str, int] = field(default_factory=dict)  # stage -> peak RSS bytes
    store: Any = None  # the run's checkpoints (toolchain.resume.Checkpoints) under --resume

    def with_results(self, **items: Any) -> "Run":
        return replace(self, results={**self.results, **items})

    @property
    def threshold_scale(self) -> float:
        """The threshold scale the run converts with: the only one given, or select's
        choice."""
        chosen = self.results.get("selection")
        return chosen["chosen"]["threshold_scale"] if chosen else self.options.threshold_scale[0]

    @property
    def keep_rule(self) -> str:
        """The keep rule the run calibrates with: the only one given, or select's choice."""
        chosen = self.results.get("selection")
        return chosen["chosen"]["keep_rule"] if chosen else self.options.keep_rule[0]


Stage = Callable[[Run], Run]
TEST_SUBSET_SEED = 0  # fixed: --seed varies calibration, never which test images are scored


def _test_subset(run: Run, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` test samples drawn by a fixed seed (the same ones in every run), in file order.
    Not the first ``n``: a test file sorted by class (the CIFAR-10 npz is) would give a
    few classes only."""
    x, y = run.data.x_test, run.data.y_test
    if n is None or n >= len(x):
        return x, y
    idx = np.sort(np.random.default_rng(TEST_SUBSET_SEED).permutation(len(x))[:n])
    return x[idx], y[idx]


def _eval_split(run: Run) -> tuple[np.ndarray, np.ndarray]:
    return _test_subset(run, run.options.eval_samples)


def _local_eval(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """This rank's shard of the evaluation split (all of it in a single process)."""
    x, y = _eval_split(run)
    distributed.check_shardable(len(x), "the evaluation set", "raise --eval-samples")
    mine = distributed.shard(len(x))
    return x[mine], y[mine]


def _scores(run: Run, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Percent correct, and percent agreeing with the ANN's top-1 (``run.ann_labels``: how
    faithful the SNN is to the network it was converted from, whatever the labels say), after
    each step, from this rank's (T, n) predictions over the whole evaluation split
    (predictions of every rank gathered in order, once)."""
    every = distributed.gather_array(predictions, axis=-1)
    return (100.0 * (every == _eval_split(run)[1]).mean(-1),
            100.0 * (every == run.ann_labels).mean(-1))


def _training_order(opts: Options, data: Any) -> np.ndarray:
    """The seeded permutation of the training split that the calibration images are drawn
    from first (select's images come next)."""
    return np.random.default_rng(opts.seed).permutation(len(data.x_train))


def _calib_count(opts: Options) -> int:
    """How many calibration images the options ask for (the keep rule's held-out share
    included)."""
    total = opts.calib_batches * opts.calib_batch_size
    return int(np.ceil(total / (1.0 - opts.holdout))) if opts.holdout < 1 else total


def _calib_data(opts: Options, data: Any) -> np.ndarray:
    """Calibration samples: a seeded subset of the TRAINING split only (never evaluation);
    the held-out part of FTBC's keep rule comes out of these too."""
    return data.x_train[np.sort(_training_order(opts, data)[:_calib_count(opts)])]


def _timed(name: str, fn: Stage) -> Stage:
    """The stage, recording its wall seconds and the peak resident memory while it ran."""
    from toolchain.memory import peak_rss_bytes, reset_peak_rss

    def stage(run: Run) -> Run:
        reset_peak_rss()
        start = time.perf_counter()
        new = fn(run)
        seconds = time.perf_counter() - start
        if new.store is not None:  # parts of this stage an earlier, stopped run computed
            seconds += new.store.take_credit()
        return replace(new, timings={**new.timings, name: seconds},
                       peak_rss={**new.peak_rss, name: peak_rss_bytes()})
    stage.__name__ = name
    return stage


def load(run: Run) -> Run:
    from toolchain.data import load_data
    from toolchain.load import load_model
    opts = run.options
    data = load_data(opts.data)
    loaded = load_model(opts.model, arch=opts.arch, arch_kwargs=dict(opts.arch_kwargs),
                        trust_pickle=opts.trust_pickle)
    return replace(run, data=data, calib=_calib_data(opts, data), loaded=loaded)


def trace(run: Run) -> Run:
    from toolchain.ann import ann_predictions
    from toolchain.data import check_input_shape, check_labels
    from toolchain.memory import check_memory
    from toolchain.trace import trace as trace_model
    shape = run.options.input_shape or tuple(run.data.x_train.shape[1:])
    check_input_shape(run.data, shape)
    try:
        ann = trace_model(run.loaded, shape)
    except InputError as exc:  # most often a model made for other inputs than the data's
        exc.add_context(f"traced on the samples of data {run.data.name}, shape {shape}: if the "
                        "model takes other inputs, name its data with --data ('mnist:DIR' 1 x "
                        "28 x 28, 'cifar10:DIR' 3 x 32 x 32, 'npz:TRAIN.npz,TEST.npz'; the "
                        "default is digits, 1 x 8 x 8)")
        raise
    check_labels(run.data, int(ann.node(ann.output).weight.shape[0]))
    opts = run.options
    memory = check_memory(ann, run.calib, timesteps=opts.timesteps,
                          calib_batch=opts.calib_batch_size,
                          eval_samples=len(_eval_split(run)[0]),
                          holdout_samples=int(round(opts.holdout * len(run.calib))))
    x, _ = _local_eval(run)
    top1 = distributed.gather_array(ann_predictions(ann, x))
    accuracy = float(100.0 * (top1 == _eval_split(run)[1]).mean())
    return replace(run, ann=ann, ann_labels=top1).with_results(
        ann_accuracy=accuracy, memory_estimate_bytes=memory)


SELECTION_SAMPLES = 1000  # training images, after the calibration draw, that choose (select)


def _selection_data(opts: Options, data: Any) -> np.ndarray:
    """The images that choose among several threshold scales or keep rules: the next (at
    most) ``SELECTION_SAMPLES`` of the calibration draw's permutation of the training split,
    so never a calibration image and never an evaluation one."""
    need = _calib_count(opts)
    idx = _training_order(opts, data)[need:need + SELECTION_SAMPLES]
    if len(idx) == 0:
        raise InputError(
            f"several --threshold-scale or --keep-rule values are chosen among on training "
            f"images outside the calibration draw, and the {len(data.x_train)} training images "
            f"of {opts.data} are all calibration images: give one value of each, or fewer "
            f"--calib-batches")
    return data.x_train[np.sort(idx)]


def _converted(run: Run, scale: float) -> SnnGraph:
    from toolchain.convert import convert as convert_ann
    opts = run.options
    extra = {k: v for k, v in (("v_init", opts.v_init), ("input_shift", opts.input_shift))
             if v is not None}
    return convert_ann(run.ann, run.calib, timesteps=opts.timesteps,
                       threshold=opts.threshold, percentile=opts.percentile,
                       threshold_scale=scale, neuron=opts.neuron, **extra)


def select(run: Run) -> Run:
    """Several ``--threshold-scale`` or ``--keep-rule`` values: for each pair, convert with
    the scale and FTBC-calibrate with the rule, and keep the pair whose FTBC network is
    closest to the ANN on selection images (training images the calibration never saw,
    ``_selection_data``): the smallest mean KL divergence from the ANN's softmax to the
    SNN's at t = T (readout / T as logits). No label is used, and ties go to the pair given
    first (scales outer, rules inner). The chosen pair's FTBC network and calibration report
    are the run's (``snn["ftbc"]``, ``results["calibration"]["ftbc"]``): calibrate does not
    compute them again. One of each: nothing to choose."""
    from toolchain.calibrate import calibrate as calibrate_snn
    from sims.progress import stderr_line
    from toolchain.fidelity import ann_log_probs, divergence_from_ann
    from toolchain.report import candidate_name, varied
    opts = run.options
    candidates = [{"threshold_scale": s, "keep_rule": r}
                  for s in opts.threshold_scale for r in opts.keep_rule]
    if len(candidates) < 2:
        return run
    keys = varied(candidates)
    x = _selection_data(opts, run.data)
    mine = x[distributed.shard(len(x))]
    reference = ann_log_probs(run.ann, mine)

    def scored(snn: SnnGraph, rule: str) -> tuple[float, SnnGraph, dict[str, Any]]:
        ftbc, report = calibrate_snn(snn, run.ann, run.calib, method="ftbc",
                                     **_calibration_settings(opts, rule))
        each = divergence_from_ann(ftbc, run.ann, mine, device=opts.device, reference=reference)
        return float(distributed.gather_array(each).mean()), ftbc, report

    scores, seen = [], []  # seen: (layers, rule, score) of each pair so far
    for s in opts.threshold_scale:
        snn = _converted(run, s)
        for r in opts.keep_rule:
            # a scale that changes no threshold (every one a clip or learned, as in QCFS
            # models) gives a network already scored: its score, not another calibration
            # (an equal score, so never the choice: ties go to the pair given first)
            same = [d for layers, rule, d in seen if rule == r and graphs_equal(layers, snn.layers)]
            if same:
                scores.append(same[0])
            else:
                score, ftbc, report = _part(run, f"select:{s!r}:{r}",
                                            lambda snn=snn, r=r: scored(snn, r))
                scores.append(score)
                if int(np.argmin(scores)) == len(scores) - 1:  # the closest so far: kept
                    closest = ftbc, report
            seen.append((snn.layers, r, scores[-1]))
            if opts.progress:
                name = candidate_name(candidates[len(scores) - 1], keys, labelled=True)
                stderr_line(f"{name}: KL divergence of FTBC's output from the ANN's "
                            f"{scores[-1]:.5g} on {len(x)} selection images")
    best = int(np.argmin(scores))
    return replace(run, snn={"ftbc": closest[0]}).with_results(
        selection={"candidates": candidates, "divergence": scores,
                   "chosen": candidates[best], "selection_samples": len(x)},
        calibration={"ftbc": closest[1]})


def convert(run: Run) -> Run:
    return replace(run, snn={**run.snn, "converted": _converted(run, run.threshold_scale)})


CALIBRATION_METHODS = ("none", "lp", "ftbc")


def calibration_methods(opts: Options) -> tuple[str, ...]:
    """The calibrations a run builds and scores: FTBC (the one deployed), with the none and
    LP baselines beside it unless ``opts.baselines`` is off."""
    return CALIBRATION_METHODS if opts.baselines else ("ftbc",)


def _calibration_settings(opts: Options, keep_rule: str | None = None) -> dict[str, Any]:
    """The user's calibration choices, as the float and the integer calibration take them;
    ``keep_rule``: the run's (``Run.keep_rule``), default the first given."""
    return dict(alpha=opts.alpha, batches=opts.calib_batches, batch_size=opts.calib_batch_size,
                iterations=opts.iterations, holdout=opts.holdout, seed=opts.seed,
                progress=opts.progress, device=opts.device,
                keep=keep_rule or opts.keep_rule[0],
                step_target=opts.ftbc_target, fit=opts.ftbc_fit)


def _part(run: Run, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``; under --resume kept as soon as it is done, or taken from a stopped
    identical run that had done it (``toolchain.resume``)."""
    return compute() if run.store is None else run.store.part(name, compute)


def calibrate(run: Run) -> Run:
    """Each of calibration_methods on the converted network, except one select has already
    calibrated (the chosen pair's FTBC), taken as it is."""
    from toolchain.calibrate import calibrate as calibrate_snn
    opts = run.options
    graphs, reports = {}, {}
    for method in calibration_methods(opts):
        if method in run.snn:
            graphs[method], reports[method] = run.snn[method], run.results["calibration"][method]
            continue
        graphs[method], reports[method] = _part(run, f"calibrate:{method}", lambda: calibrate_snn(
            run.snn["converted"], run.ann, run.calib, method=method,
            **_calibration_settings(opts, run.keep_rule)))
    return replace(run, snn={**run.snn, **graphs}).with_results(calibration=reports)


def simulate(run: Run) -> Run:
    from sims.torch_snn import simulate as simulate_snn
    x, _ = _local_eval(run)
    opts = run.options
    scores = {m: _part(run, f"simulate:{m}", lambda: _scores(run, simulate_snn(
                  run.snn[m], x, progress=opts.progress, device=opts.device).predictions))
              for m in calibration_methods(opts)}
    return run.with_results(snn_accuracy={m: a.tolist() for m, (a, _) in scores.items()},
                            snn_agreement={m: a.tolist() for m, (_, a) in scores.items()})


def normalize(run: Run) -> Run:
    from toolchain.normalize import normalize as normalize_snn
    return replace(run, normalized=normalize_snn(run.snn["ftbc"]))


def input_range(data: Any) -> tuple[float, float]:
    """The raw input's range, from the training split (the input encoding's scale is
    chosen so that it never clips; evaluation values outside it are counted as clipped)."""
    return float(np.min(data.x_train)), float(np.max(data.x_train))


def quantize(run: Run) -> Run:
    from exporters.quantize import check, quantization_report
    from exporters.quantize import quantize as quantize_snn
    from hw_targets import get_target
    from toolchain.report import provenance
    target = get_target(run.options.target)
    if not target.quantized:
        return run
    q = quantize_snn(run.normalized, target, input_range=input_range(run.data))
    q = replace(q, meta={**q.meta, "provenance": provenance(run)})
    check(q, target)
    return replace(run, quant=q).with_results(quantization=quantization_report(q))


def calibrate_fixed(run: Run) -> Run:
    """FTBC again on the quantized network (integer bias mantissas, bit-exact emulator), so
    quantization error is corrected too; the same held-out keep rule as the float pass."""
    from exporters.quantize import check, quantization_report
    from hw_targets import get_target
    from toolchain.calibrate_fixed import calibrate_fixed as calibrate_q, float_thresholds
    opts = run.options
    if run.quant is None or not opts.calibrate_fixed:
        return run
    target = get_target(opts.target)
    q, rep = calibrate_q(run.quant, run.ann, run.calib,
                         thresholds=float_thresholds(run.snn["converted"]), target=target,
                         **_calibration_settings(opts, run.keep_rule))
    check(q, target)
    return replace(run, quant=q).with_results(fixed_calibration=rep,
                                              quantization=quantization_report(q))


def emulate(run: Run) -> Run:
    from hw_targets import get_target
    from sims.activity import activity_from_counts
    from sims.emulator import emulate as emulate_q
    from sims.reference import clipped_inputs
    if run.quant is None:
        return run
    x, _ = _local_eval(run)
    result = emulate_q(run.quant, x, progress=run.options.progress, device=run.options.device)
    clipped = distributed.sum_int(clipped_inputs(
        run.quant.input, x, get_target(run.options.target).input_payload_bits))
    saturations = {k: distributed.sum_int(v) for k, v in sorted(result.saturations.items())}
    activity = activity_from_counts(run.quant, x, result.neuron_spikes,
                                    source=f"{run.options.data} evaluation split",
                                    negative_spikes=result.negative_spikes)
    accuracy, agreement = _scores(run, result.predictions)
    return replace(run, activity=activity).with_results(
        fixed_accuracy=accuracy.tolist(), fixed_agreement=agreement.tolist(),
        saturations={k: saturations[k] for k in result.saturations},
        input_clipped={"values": clipped, "of": int(len(_eval_split(run)[0]) * np.prod(
            run.quant.input.shape)), "range": run.quant.meta["input_range"]})


def export(run: Run) -> Run:
    from exporters.netx import write_netx
    if run.quant is None:
        return run
    path = run.options.out_dir / "network.net"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_netx(run.quant, path)
    return run.with_results(network=path.name)


def netlist(run: Run) -> Run:
    """Loihi 2 targets: netlist.json with core assignment, activity and energy estimate (the
    activity of the emulate stage's pass over the evaluation split). Its limit violations are
    reported, not fatal: several limits are documented assumptions."""
    from exporters.netlist import build_netlist, netlist_summary_lines, write_netlist
    from hw_targets import get_target
    from hw_targets.loihi2_resources import resources_for
    target = get_target(run.options.target)
    if run.quant is None or resources_for(target.name) is None:
        return run
    nl = build_netlist(run.quant, target, run.activity)
    write_netlist(nl, run.options.out_dir / "netlist.json")
    return run.with_results(netlist={
        "file": "netlist.json", "summary": netlist_summary_lines(nl), "totals": nl["totals"],
        "fits": nl["fits"], "violations": nl["violations"],
        "activity": nl["activity"] and {**nl["activity"]["totals"],
                                        "energy": nl["activity"]["energy"]}})


def export_nir(run: Run) -> Run:
    """``--target nir``: the calibrated, normalised float SNN as a NIR graph."""
    from exporters.nir_export import write_nir
    if run.options.target != "nir":
        return run
    path = run.options.out_dir / "network.nir"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_nir(run.normalized, path)
    return run.with_results(network=path.name)


def verify(run: Run) -> Run:
    from hw_targets import get_target
    from sims.verify import verify as verify_lava
    opts = run.options
    if run.quant is None or not get_target(opts.target).simulated or opts.verify_samples <= 0:
        return run
    x, y = _test_subset(run, opts.verify_samples)
    lava = verify_lava(run.quant, opts.out_dir / run.results["network"], x, y,
                       workers=opts.verify_workers, progress=opts.progress)
    return run.with_results(lava=lava)


def report(run: Run) -> Run:
    from toolchain.report import write_report
    write_report(run)
    return run


def _main_rank_only(fn: Stage) -> Stage:
    """A stage that writes or prints (or runs Lava): rank 0 alone runs it; the other ranks of
    a data-parallel run pass the run on unchanged (they hold no complete results)."""
    def stage(run: Run) -> Run:
        return fn(run) if distributed.is_main() else run
    stage.__name__ = fn.__name__
    return stage


# Every file a run may write into --out: a run commits its own and removes the others'
# (an earlier run's network.net must not sit beside a float run's report.json).
OUTPUT_FILES = ("report.json", "accuracy.png", "network.net", "netlist.json", "network.nir")

STAGES: tuple[Stage, ...] = tuple(_timed(fn.__name__, fn) for fn in (
    load, trace, select, convert, calibrate, simulate, normalize, quantize,
    calibrate_fixed, emulate,
    *map(_main_rank_only, (export, netlist, export_nir, verify, report)),
))


# Under --resume the checkpoint's key is taken once KEY_STAGE has run (it needs the data, the
# calibration draw and the traced ANN), and a checkpoint is kept after each stage from there
# to LAST_CHECKPOINT. The stages before are run again on resuming, and so are the ones after:
# they write into --out (a fresh staging folder on every CLI run) or read what was written
# there, and take seconds (Lava verification aside, which has no checkpoint inside).
KEY_STAGE, LAST_CHECKPOINT = "trace", "emulate"


def run_pipeline(options: Options, on_stage: Callable[[int, str], None] | None = None,
                 resume: Path | None = None) -> Run:
    """Run every stage in order; ``on_stage(index, name)`` is called before each.

    ``resume``: a checkpoint folder (``toolchain.resume``). The run keeps its state there as
    it goes, and continues after the last stage an identical earlier run had finished there;
    report.json then says what was taken from it ("resumed")."""
    from toolchain.resume import open_checkpoints
    if resume is not None and distributed.launched():
        raise InputError("--resume is for single-process runs, not torchrun's ranks")
    names = [stage.__name__ for stage in STAGES]
    first, last = names.index(KEY_STAGE) + 1, names.index(LAST_CHECKPOINT)
    run = Run(options=options)
    done = -1
    for index, stage in enumerate(STAGES):
        if index <= done:
            continue
        if on_stage is not None:
            on_stage(index, stage.__name__)
        run = stage(run)
        if resume is not None and index == first - 1:
            run, done = open_checkpoints(run, resume)
        if run.store is None:
            continue
        if run.store.record() is not None:  # before report.json is written
            run = run.with_results(resumed=run.store.record())
        if first <= index <= last:
            run.store.finished(index, stage.__name__, run)
    return run
