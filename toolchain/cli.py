"""``ftbc-export``: the command line."""
from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import gc
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

INTERRUPTED = "interrupted; previous outputs left intact"


def _stop_while_starting(signum, frame):
    """SIGINT/SIGTERM while the program is still importing torch (seconds): nothing has
    been read or written yet, so stop at once with the usual line and exit code."""
    os.write(2, f"ftbc-export: {INTERRUPTED}\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__" or Path(sys.argv[0]).name == "ftbc-export":  # run as a program
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stop_while_starting)

from core import distributed  # noqa: E402 - torch: after the handlers above
from core.distributed import DEFAULT_TIMEOUT_S  # noqa: E402
from core.errors import FtbcError, InputError  # noqa: E402

EXIT_CODES = """exit codes:
  0  success
  1  internal error (a bug in ftbc: please report it with the command line)
  2  unsupported model or bad input (file, data, options)
  3  hardware limit exceeded (every violation is listed)
  4  verification mismatch: Lava differs from the bit-exact emulator
  5  data-parallel run (torchrun) failed: another rank failed, was killed or cannot be
     reached (torchrun names the rank that failed first)
  6  Lava verification could not complete: a verification worker or a Lava runtime
     process died, failed or hung (named in the message)
  130/143  interrupted by SIGINT/SIGTERM (previous outputs in --out left intact)
"""

DESCRIPTION = """Convert a trained PyTorch ANN (ReLU-like activations) into a spiking network of
integrate-and-fire neurons (QCFS-trained activations keep their learned thresholds; README,
"Models trained for conversion"), calibrate it with FTBC (forward temporal bias correction),
normalise thresholds to 1, quantize it for Loihi 2, export it as a lava-dl netx HDF5 file
with time-indexed bias schedules, and prove it in Lava's bit-accurate CPU simulation.

Outputs in --out: report.json, accuracy.png, network.net (quantized targets). They are
written to a staging folder inside --out and moved into place only when the whole run
succeeded: a failed or interrupted run leaves the previous outputs as they were."""

EPILOG = """model formats: TorchScript (torch.jit.save), torch.export programs (.pt2),
state_dict files with --arch; pickled whole modules only with --trust-pickle.
data: digits (built in, scikit-learn's 8x8 digits, seeded 80/20 split) | mnist:DIR
(DIR/mnist_{train,test}.npz, uint8 x, y) | cifar10:DIR (DIR/cifar10_{train,test}.npz, uint8
x (N, 32, 32, 3) RGB -> (N, 3, 32, 32) in [0, 1]) | npz:TRAIN.npz,TEST.npz (float x as the
model expects it, integer y). Calibration uses the training split only.

data-parallel: torchrun --nproc-per-node N [--nnodes M ...] -m toolchain.cli MODEL ...
shards threshold statistics, FTBC calibration and evaluation over the ranks (gloo);
rank 0 alone writes the outputs and runs the Lava verification. Results equal a
single-process run (see README, "Data-parallel runs").

""" + EXIT_CODES


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W or F (integers), got {text!r}")
    if not shape or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"dimensions must be positive, got {text!r}")
    return shape


def _positive(kind: type, zero: bool = False):
    """A finite number > 0 (>= 0 with ``zero``); NaN and Inf are refused."""
    def parse(text: str):
        value = kind(text)
        finite = kind is int or math.isfinite(value)  # ints are finite (and may be huge)
        if not finite or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"must be {'>= 0' if zero else '> 0'} and finite, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _directory(text: str) -> Path:
    """A path; the empty string is refused (Path("") would silently mean the current
    directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path; give an output directory")
    return Path(text)


def _distinct(option: str, values: list) -> tuple:
    """The values of an option that takes several (select chooses among them), each once."""
    twice = [f"{v:g}" if isinstance(v, float) else v
             for v in sorted({v for v in values if values.count(v) > 1})]
    if twice:
        raise InputError(f"{option} gives {', '.join(twice)} more than once; give each value "
                         "once")
    return tuple(values)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from toolchain.calibration import FITS, KEEP_RULES, STEP_TARGETS
    from toolchain.convert import NEURONS
    from toolchain.pipeline import Options  # the calibration defaults: written once, there

    p = argparse.ArgumentParser(prog="ftbc-export", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", type=Path, help="trained model file")
    p.add_argument("--target", default="loihi2-sim",
                   help="hardware target (default loihi2-sim; see --list-targets)")
    p.add_argument("--list-targets", action="store_true", help="list targets and exit")
    p.add_argument("--data", default="digits", help="data set (default digits; see below)")
    p.add_argument("--out", type=_directory, help="output directory (default build/<model name>)")
    p.add_argument("--resume", action="store_true",
                   help="keep a checkpoint in OUT/.ftbc-resume after every stage (and after "
                        "each method inside calibration and scoring), and continue a stopped "
                        "run of the same command from it: options, model, data and ftbc's "
                        "code must be the same, else it starts afresh. Removed once the run "
                        "succeeds. Meant for long runs that a scheduler may stop and requeue "
                        "or a machine going down may cut short (README, 'Long runs')")
    p.add_argument("--input-shape", type=_shape, metavar="C,H,W",
                   help="model input shape without batch (default: from the data set)")
    g = p.add_argument_group("model loading")
    g.add_argument("--arch", metavar="pkg.module:Class", help="architecture for a state_dict")
    g.add_argument("--arch-kwargs", default="{}", metavar="JSON",
                   help="keyword arguments for --arch as a JSON object")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled whole module (runs code from the file!)")
    g = p.add_argument_group("conversion")
    g.add_argument("--timesteps", "-T", type=_positive(int), default=16,
                   help="simulation time steps T (default 16)")
    g.add_argument("--threshold", choices=("max", "percentile", "mse"), default="mse",
                   help="per-channel threshold rule (default mse: search fractions of the "
                        "max for this T)")
    g.add_argument("--percentile", type=float, default=99.99,
                   help="percentile for --threshold percentile (default 99.99)")
    g.add_argument("--threshold-scale", type=_positive(float), nargs="+",
                   default=list(Options.threshold_scale), metavar="S",
                   help="multiply every searched threshold by S > 0 (default 1; clips and "
                        "QCFS's learned thresholds keep theirs). The per-layer search weighs "
                        "clipping's one-signed error like rounding's, so at small T a scale "
                        "above 1 can suit the whole network better: on the CIFAR ResNet-20 "
                        "with --neuron signed at T = 2, S = 1.15 (chosen on validation images) "
                        "took the fixed-point drop from the ANN from 23.7 to 21.6 points "
                        "(bench/README.md, 'Accuracy on residual networks', part 17). Several "
                        "values (e.g. 1 1.15 1.3 1.5): FTBC-calibrate with each and keep the "
                        "one whose output is closest to the ANN's (KL divergence) on up to "
                        "1,000 training images outside the calibration draw; costs one "
                        "conversion and FTBC calibration per value, and report.json says what "
                        "each scored. On that network at T = 2 it chose 1.15 in every seed; "
                        "with the IF neuron at T = 4, where 1.15 loses, it kept 1 (part 18)")
    g.add_argument("--v-init", type=float, metavar="FRACTION",
                   help="initial membrane potential as a fraction of the threshold")
    g.add_argument("--input-shift", action=argparse.BooleanOptionalAction, default=None,
                   help="add theta/(2T) to the input current at every step")
    g.add_argument("--neuron", choices=NEURONS, default=Options.neuron,
                   help="if (default): the paper's integrate-and-fire neuron. signed: a neuron "
                        "that also sends a -1 spike (and adds its threshold back) when its "
                        "membrane is below 0 and its net spike count is positive, so it can "
                        "take back a spike sent too early. On the QCFS-trained CIFAR "
                        "ResNet-20 (L = 4) the fixed-point drop from the ANN at T = 2 falls "
                        "from 26.8 to 15.0 points, at T = 4 from 8.7 to 1.3 (bench/README.md, "
                        "'Accuracy on residual networks', part 9), for about 1.5x the spikes "
                        "(the ReLU-trained one at T = 8, part 8); spikes "
                        "are sent as signed graded payloads, and the lava-dl netx view of "
                        "the file ends before the first signed layer (docs/netx.md)")
    g = p.add_argument_group("FTBC calibration (training data only)")
    g.add_argument("--alpha", type=_positive(float), default=Options.alpha,
                   help=f"bias update rate (default {Options.alpha:g})")
    g.add_argument("--calib-batches", type=_positive(int), default=Options.calib_batches,
                   help=f"default {Options.calib_batches}")
    g.add_argument("--calib-batch-size", type=_positive(int), default=Options.calib_batch_size,
                   help=f"default {Options.calib_batch_size}")
    g.add_argument("--iterations", type=_positive(int), default=Options.iterations,
                   help=f"default {Options.iterations}")
    g.add_argument("--holdout", type=_fraction, default=Options.holdout,
                   help="fraction of the calibration samples held out to decide which "
                        f"corrections to keep (default {Options.holdout:g})")
    g.add_argument("--keep-rule", choices=KEEP_RULES, nargs="+",
                   default=list(Options.keep_rule), metavar="RULE",
                   help="layer: keep a layer's correction only if it lowers the held-out "
                        "error of the network's output (default); lenient: keep it unless it "
                        "raises that error significantly (paired over the held-out samples, "
                        "more than 2 standard errors; measured on validation images better "
                        "on the CIFAR-10 ResNet-20s at T = 1-2 and level from T = 4, worse on "
                        "VGG-16 at T = 1-2: bench/README.md parts 11 and 13); "
                        "network: keep every layer's correction (the authors' algorithm) and "
                        "revert them all only if the held-out agreement with the ANN drops. "
                        "Several (e.g. layer network lenient): calibrate with each and keep "
                        "the one whose FTBC output is closest to the ANN's, as for several "
                        "--threshold-scale values (with both, every pair is tried); on the "
                        "CIFAR ResNet-20s at T = 1-4 that picked a rule 0.9 points above "
                        "layer on validation images (mean of 18 seed-rows), level on the "
                        "MNIST CNNs (bench/README.md part 19)")
    g.add_argument("--ftbc-target", choices=STEP_TARGETS, default=Options.ftbc_target,
                   help="FTBC's per-step target. ideal (default): each step's firing is "
                        "pulled to that of an ideal IF neuron (same threshold and v_init, the "
                        "ANN activation as constant input), shifted so the T steps sum to the "
                        "ANN's mean activation; paper: every step's firing is pulled to the "
                        "ANN's mean activation, as the paper's Algorithm 1 does. On validation "
                        "data ideal scores better at t = T on the CIFAR ResNet-20s (paper "
                        "loses to LP on the QCFS L = 8 one), equal on MNIST and VGG-16; "
                        "paper is ahead at early t < T (bench/README.md)")
    g.add_argument("--ftbc-fit", choices=FITS, default=Options.ftbc_fit,
                   help="how FTBC fits each step's bias. sweep (default): the paper's update, "
                        "--iterations passes over the calibration batches moving the bias by "
                        "--alpha times the rate error; solve: the point those passes move "
                        "towards, found directly per step and channel by bisection (no "
                        "--alpha or --iterations; the same in the integer FTBC). On "
                        "validation data solve is ahead at T = 1 on a QCFS ResNet-20 with "
                        "--keep-rule network and mixed elsewhere (bench/README.md part 15)")
    g.add_argument("--calibrate-fixed", action=argparse.BooleanOptionalAction, default=True,
                   help="after quantization, run FTBC again on the integer network with the "
                        "bit-exact emulator (integer bias mantissas; same alpha, batches, "
                        "iterations and holdout rule) so quantization error is corrected too "
                        "(default on)")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also calibrate and score the baselines beside FTBC: none (plain "
                        "conversion) and LP, for the report's comparison (default on; "
                        "--no-baselines roughly halves the float calibration's time)")
    g = p.add_argument_group("evaluation and verification")
    g.add_argument("--eval-samples", type=_positive(int),
                   help="evaluate on N test samples drawn by a fixed seed, the same N in "
                        "every run (default: all)")
    g.add_argument("--verify-samples", type=_positive(int, zero=True), default=None,
                   help="test samples (drawn by a fixed seed) run in Lava and compared spike "
                        "for spike; loihi2-sim only (default 100 there; 0 skips)")
    g.add_argument("--verify-workers", type=_positive(int), metavar="N",
                   help="worker processes for the Lava verification, one Lava runtime each, "
                        "samples split between them (default: the number of cores)")
    g.add_argument("--seed", type=_positive(int, zero=True), default=Options.seed,
                   help=f"random seed, >= 0 (default {Options.seed})")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                   help="torch device of the simulations and calibrations (default cpu; auto: "
                        "cuda when torch sees one); the integer emulation is exact on any")
    g.add_argument("--dist-timeout", type=_positive(float), default=DEFAULT_TIMEOUT_S,
                   metavar="SECONDS",
                   help="under torchrun: how long a rank waits for the others in a "
                        f"collective before it gives up (exit 5; default {DEFAULT_TIMEOUT_S:g})")
    return p


def list_targets() -> str:
    from hw_targets import TARGETS
    return "\n".join(f"{name:12s} {t.description}" for name, t in TARGETS.items())


def options_from_args(args: argparse.Namespace, argv: list[str]):
    from hw_targets import get_target
    from toolchain.load import check_model_file
    from toolchain.pipeline import Options
    if args.model is None:
        raise InputError("no model file given (usage: ftbc-export MODEL [options]; see --help)")
    target = get_target(args.target)  # unknown target -> InputError listing the valid ones
    if args.verify_samples and not target.simulated:
        raise InputError(f"--verify-samples runs the network in Lava, which target "
                         f"{args.target} does not; use --target loihi2-sim to verify, or "
                         "drop --verify-samples")
    from sims.engine import resolve_device
    resolve_device(args.device)  # cuda without a GPU -> InputError
    check_model_file(args.model)
    try:
        arch_kwargs = json.loads(args.arch_kwargs)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"--arch-kwargs is not valid JSON: {exc}") from None
    if not isinstance(arch_kwargs, dict):
        raise InputError("--arch-kwargs must be a JSON object, e.g. '{\"width\": 32}'")
    options = Options(
        model=args.model, target=args.target, data=args.data, out=args.out,
        input_shape=args.input_shape, arch=args.arch, arch_kwargs=arch_kwargs,
        trust_pickle=args.trust_pickle, timesteps=args.timesteps, threshold=args.threshold,
        percentile=args.percentile,
        threshold_scale=_distinct("--threshold-scale", args.threshold_scale),
        v_init=args.v_init, input_shift=args.input_shift,
        alpha=args.alpha, calib_batches=args.calib_batches,
        calib_batch_size=args.calib_batch_size, iterations=args.iterations,
        holdout=args.holdout, keep_rule=_distinct("--keep-rule", args.keep_rule),
        ftbc_target=args.ftbc_target,
        ftbc_fit=args.ftbc_fit,
        neuron=args.neuron,
        calibrate_fixed=args.calibrate_fixed, baselines=args.baselines,
        eval_samples=args.eval_samples,
        seed=args.seed,
        **({} if args.verify_samples is None else {"verify_samples": args.verify_samples}),
        **({} if args.verify_workers is None else {"verify_workers": args.verify_workers}),
        progress=not args.no_progress and distributed.is_main(),
        device=args.device, resume=args.resume,
        command_line=shlex.join(["ftbc-export", *argv]))
    _check_inputs_outside_outputs(options)
    if options.resume and distributed.launched():
        raise InputError("--resume is for single-process runs; drop it under torchrun")
    return options


def _input_files(options) -> list[Path]:
    """The files a run reads: the model and npz data files."""
    kind, _, spec = options.data.partition(":")
    data = [Path(p) for p in spec.split(",") if p] if kind == "npz" else []
    return [options.model, *data]


def _check_inputs_outside_outputs(options) -> None:
    """Never overwrite (or remove as stale) an input: refuse an input file that sits in
    --out under an output's name."""
    from toolchain.pipeline import OUTPUT_FILES
    out = options.out_dir.resolve()
    for path in _input_files(options):
        if path.resolve().parent == out and path.name in OUTPUT_FILES:
            raise InputError(f"input file {path} is in the output directory under an output's "
                             f"name ({path.name}) and would be overwritten; move it or choose "
                             "another --out")


STAGING_PREFIX = ".ftbc-staging-"
# Errors of the output file system: a one-line "cannot write" error (exit 2), not a bug.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                   errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
                   errno.EFBIG}


def _remove_stale_staging(out: Path) -> None:
    """Staging folders left by runs that were killed hard (SIGKILL, power loss)."""
    for folder in out.glob(STAGING_PREFIX + "*"):
        try:
            os.kill(int(folder.name[len(STAGING_PREFIX):].split("-")[0]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # pid alive, owned by someone else
            pass


def prepare_output(out: Path) -> tuple[Path, list[Path]]:
    """Create ``out`` if needed and a private staging folder inside it (same file system,
    so that finished outputs are moved into place by ``os.replace``). Returns (staging,
    the folders created here, deepest first). One-line ``InputError`` naming the path
    otherwise."""
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(f"output path {out} exists and is not a directory; "
                         "choose another --out") from None
    except OSError as exc:
        raise InputError(f"cannot create output directory {out}: "
                         f"{exc.strerror or exc}; choose another --out") from None
    _remove_stale_staging(out)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
    except OSError as exc:
        raise InputError(f"output directory {out} is not writable: "
                         f"{exc.strerror or exc}; choose another --out") from None
    return staging, created


def commit_outputs(staging: Path, out: Path, stale: tuple[str, ...] = ()) -> list[str]:
    """Move every finished output from ``staging`` into ``out`` (each by one rename, with
    SIGINT/SIGTERM held back so a kill cannot land between two files), then remove the
    files named in ``stale`` that this run did not write: the committed set is this run's."""
    names = sorted(p.name for p in staging.iterdir())
    clash = [n for n in names if (out / n).exists()
             and (out / n).is_dir() != (staging / n).is_dir()]
    if clash:  # checked before anything moves: all outputs or none
        raise InputError(f"cannot write outputs: {out / clash[0]} exists and is "
                         f"{'a' if (out / clash[0]).is_dir() else 'not a'} directory")
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for name in names:
            target = out / name
            if (staging / name).is_dir() and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)  # an output folder of a previous run
            os.replace(staging / name, target)
        for name in sorted(set(stale) - set(names)):
            if (out / name).is_file() or (out / name).is_symlink():
                (out / name).unlink()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return names


def _run(options) -> int:
    from core.errors import VerificationError
    from toolchain.pipeline import OUTPUT_FILES, STAGES, run_pipeline
    from toolchain.report import build_report, summary_lines
    from sims.progress import stderr_line
    from toolchain.resume import FOLDER as RESUME_FOLDER

    def announce(index: int, name: str) -> None:
        _raise_if_stopped()
        if options.progress:
            stderr_line(f"[{index + 1}/{len(STAGES)}] {name}")

    if not distributed.is_main():  # a worker rank: computes its shares, writes nothing
        run_pipeline(options)
        return 0
    out = options.out_dir
    staging, created = prepare_output(out)
    try:
        checkpoints = out / RESUME_FOLDER if options.resume else None
        run = run_pipeline(replace(options, out=staging), on_stage=announce,
                           resume=checkpoints)
        _raise_if_stopped()
        commit_outputs(staging, out, stale=OUTPUT_FILES)
        if checkpoints is not None:  # the run is complete: nothing left to resume
            shutil.rmtree(checkpoints, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # a failed first run leaves no empty folders behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    report = build_report(replace(run, options=options))
    print("\n".join(summary_lines(report)))
    print(f"outputs in {out}/")
    lava = report.get("lava")
    if lava and (lava["spike_mismatches"] or lava["readout_mismatches"]):
        raise VerificationError(f"Lava differs from the emulator: first mismatch "
                                f"{lava['first_mismatch']} (details in report.json)")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM: unwinds like Ctrl-C (staging folder removed, previous outputs kept)."""


def _stop(signum, frame):
    """SIGINT or SIGTERM: unwind once. Further signals are ignored from here on, so that a
    second Ctrl-C cannot interrupt the clean-up (staging folder, Lava workers) half-way.
    The signal is also remembered: should the exception be swallowed (raised inside a
    destructor or an at-fork hook, where Python only reports it), the next stage raises it
    again (``_raise_if_stopped``) instead of the run going on."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _stopped.append(signum)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


_stopped: list[int] = []


def _raise_if_stopped() -> None:
    if _stopped:
        raise Terminated if _stopped[0] == signal.SIGTERM else KeyboardInterrupt


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _quiet_stop(unraisable, report) -> None:
    """``sys.unraisablehook`` while ``main`` runs: an interrupt raised where Python cannot
    propagate it (a destructor, a weakref callback) is not reported as "Exception ignored"
    with a traceback: ``_stop`` remembered it and the next stage raises it again."""
    if isinstance(unraisable.exc_value, KeyboardInterrupt) and _stopped:
        return
    report(unraisable)


@contextlib.contextmanager
def _stop_handlers():
    """``_stop`` for SIGINT and SIGTERM while ``main`` runs; the caller's handlers after."""
    _stopped.clear()
    previous = {sig: signal.signal(sig, _stop) for sig in _STOP_SIGNALS}
    hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_quiet_stop, report=hook)
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for sig, handler in previous.items():  # a program exits now: late signals ignored
            signal.signal(sig, signal.SIG_IGN if handler is _stop_while_starting else handler)


def _storage_error(exc: OSError, out: Path | None) -> str | None:
    """A one-line message for an output file-system failure (full, read-only, ...)."""
    if exc.errno not in _STORAGE_ERRNOS:
        return None
    where = exc.filename or out
    return f"cannot write outputs ({where}): {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.list_targets:
        print(list_targets())
        return 0
    with _stop_handlers():
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    options = None
    try:
        distributed.init_from_env(args.dist_timeout)
        options = options_from_args(args, argv)
        return _run(options)
    except FtbcError as exc:
        return _error(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:
        interrupted = 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    except MemoryError:
        return _error("out of memory; lower --calib-batch-size, --eval-samples or "
                      "--timesteps", InputError.exit_code)
    except OSError as exc:
        message = _storage_error(exc, options.out_dir if options else None)
        if message is None:
            return _internal_error(exc)
        return _error(message, InputError.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last line of defence, exit code 1
        if distributed.launched() and distributed.is_peer_failure(exc):
            return _peer_failure(exc)
        return _internal_error(exc)
    finally:
        distributed.shutdown()
    # Interrupted: the unwound frames are released first, so that whatever they held is
    # finalised before the message and the message stays the last line on stderr.
    gc.collect()
    from sims.progress import close_all_bars
    close_all_bars()
    print(f"{_prog()}: {INTERRUPTED}", file=sys.stderr)
    return interrupted


def _prog() -> str:
    """``ftbc-export``, with the rank under torchrun (every rank prints its own errors)."""
    if not distributed.launched():
        return "ftbc-export"
    return f"ftbc-export[rank {distributed.env_rank()}/{distributed.env_world_size()}]"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _error(message: str, code: int) -> int:
    """Print the one-line error; under torchrun also leave it for the other ranks."""
    print(f"{_prog()}: error: {message}", file=sys.stderr)
    distributed.report_failure(f"error: {message}")
    return code


def _peer_failure(exc: BaseException) -> int:
    """A collective failed: name the rank(s) that reported why they stopped, if any."""
    failed = distributed.failed_peers()
    if failed:
        why = "; ".join(f"rank {r} stopped with {msg}" for r, msg in sorted(failed.items()))
    else:
        why = ("another rank was killed, crashed or stopped answering (torchrun's summary "
               f"names it); {_first_line(exc)}")
    print(f"{_prog()}: error: lost the other ranks of this torchrun job: {why}",
          file=sys.stderr)
    return distributed.EXIT_CODE


def _internal_error(exc: BaseException) -> int:
    print(f"{_prog()}: internal error: {type(exc).__name__}: {exc}\n"
          f"This is a bug in ftbc; please report it with the command line.",
          file=sys.stderr)
    distributed.report_failure(f"internal error: {type(exc).__name__}: {_first_line(exc)}")
    return 1


def entry() -> None:
    """The program (console script, ``python -m toolchain.cli``, torchrun): ``main()``'s code
    is the exit status. After an interrupt the run has unwound, cleaned up and printed its one
    line: it leaves at once (``os._exit``), so that nothing in interpreter finalisation can
    turn 130 / 143 into a death by signal (seen rarely in tests sending two Ctrl-Cs 50 ms
    apart: exit -2 after the correct line; the cause was not found)."""
    try:
        code = main()
    except KeyboardInterrupt:
        if not _stopped:
            raise
        code = 128 + _stopped[0]
    if _stopped:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
