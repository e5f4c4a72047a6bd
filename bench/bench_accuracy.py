"""Accuracy after T steps for none / lp / ftbc (float) and fixed point, per T, with timings.

Runs the real pipeline (no Lava: --verify-samples 0) once per T, each T in a fresh process
so that its peak RSS (the largest per-stage peak) is that T's own, and collects report.json
figures into a markdown table.

    .venv/bin/python bench/bench_accuracy.py --model examples/digits_cnn.pt --data digits \\
        --timesteps 1 2 4 8 16 32 64 --out bench/out/digits
    .venv/bin/python bench/bench_accuracy.py --model bench/models/mnist_cnn.pt \\
        --data mnist:../shared/data/mnist --timesteps 1 2 4 8 16 32 64 --out bench/out/mnist
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.calibration import FITS, KEEP_RULES, STEP_TARGETS  # noqa: E402
from toolchain.convert import NEURONS  # noqa: E402
from toolchain.pipeline import Options, run_pipeline  # noqa: E402
from toolchain.report import build_report, selection_line  # noqa: E402
from toolchain.resume import FOLDER as RESUME_FOLDER  # noqa: E402


def one_run(args: argparse.Namespace, steps: int) -> dict:
    options = Options(model=Path(args.model), target=args.target, data=args.data,
                      out=Path(args.out) / f"T{steps}", timesteps=steps, verify_samples=0,
                      eval_samples=args.eval_samples, seed=args.seed,
                      ftbc_target=args.ftbc_target, baselines=args.baselines,
                      neuron=args.neuron, keep_rule=tuple(args.keep_rule),
                      ftbc_fit=args.ftbc_fit,
                      threshold_scale=tuple(args.threshold_scale), progress=False)
    start = time.perf_counter()
    resume = options.out_dir / RESUME_FOLDER if args.resume else None
    report = build_report(run_pipeline(options, resume=resume))
    report["wall_seconds"] = time.perf_counter() - start
    if "resumed" in report:  # this process's part alone would say little: the stages' sum
        report["wall_seconds"] = sum(report["seconds"].values())
    report["peak_rss_mib_per_stage"] = report.pop("peak_rss_mib")
    # the largest stage peak: the pipeline resets the kernel's high-water mark before each
    # stage (``toolchain.memory.reset_peak_rss``), and ``ru_maxrss`` reads that same mark,
    # so at the end it holds only the last stage's window
    report["peak_rss_mib"] = max(report["peak_rss_mib_per_stage"].values())
    return report


def run_child(argv: list[str], steps: int) -> dict:
    """``one_run`` in a fresh interpreter (its peak memory is this T's alone)."""
    out = subprocess.run([sys.executable, __file__, *argv, "--child", str(steps)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(steps: int, r: dict) -> str:
    acc = {m: f"{a[-1]:.2f}" for m, a in r["snn_accuracy"].items()}
    fixed = r.get("fixed_accuracy", [float("nan")])[-1]
    agreement = {**r["snn_agreement"], "fixed": r.get("fixed_agreement")}
    agree = [f"{a[-1]:.2f}" if a else "-" for a in
             (agreement.get(m) for m in ("none", "lp", "ftbc", "fixed"))]
    cal = r["calibration"]
    return (f"| {steps} | {r['ann_accuracy']:.2f} | {acc.get('none', '-')} "
            f"| {acc.get('lp', '-')} | {acc['ftbc']} | {fixed:.2f} | {' / '.join(agree)} "
            f"| {r['seconds']['convert']:.1f} "
            f"| {cal['ftbc']['seconds']:.1f} | {r['wall_seconds']:.0f} "
            f"| {r['peak_rss_mib']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", default="loihi2")
    p.add_argument("--timesteps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--eval-samples", type=int)
    p.add_argument("--seed", type=int, default=0, help="calibration seed (the test images "
                   "are drawn by a fixed seed whatever this is, so rows of two seeds pair)")
    p.add_argument("--ftbc-target", default=Options.ftbc_target, choices=STEP_TARGETS,
                   help="FTBC's per-step target (ftbc-export's --ftbc-target)")
    p.add_argument("--neuron", default=Options.neuron, choices=NEURONS,
                   help="the spiking neuron (ftbc-export's --neuron)")
    p.add_argument("--keep-rule", default=list(Options.keep_rule), choices=KEEP_RULES,
                   nargs="+", metavar="RULE",
                   help="the calibration's keep rule; several: chosen like several scales "
                        "(ftbc-export's --keep-rule)")
    p.add_argument("--ftbc-fit", default=Options.ftbc_fit, choices=FITS,
                   help="FTBC's fit (ftbc-export's --ftbc-fit)")
    p.add_argument("--threshold-scale", type=float, nargs="+",
                   default=list(Options.threshold_scale), metavar="S",
                   help="searched thresholds times S; several: the one whose FTBC network is "
                        "closest to the ANN on selection images (ftbc-export's "
                        "--threshold-scale)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also none and LP (ftbc-export's --baselines; --no-baselines: FTBC "
                        "and fixed point only, about half the calibration time)")
    p.add_argument("--out", default="bench/out/accuracy")
    p.add_argument("--resume", action="store_true",
                   help="checkpoints in OUT/T<n>/.ftbc-resume, kept after the run: a stopped "
                        "T continues where it stopped, a finished one reruns only its first "
                        "and last stages (seconds). A resumed T's wall seconds are its "
                        "stages' sum, its peak RSS this process's")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(one_run(args, args.child)))
        return
    print("| T | ANN | none | lp | ftbc | fixed (ftbc) "
          "| agreement with the ANN: none / lp / ftbc / fixed | convert s | ftbc calib s "
          "| wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    results = {}
    for steps in args.timesteps:
        results[steps] = run_child(argv, steps)
        print(row(steps, results[steps]), flush=True)
    for steps, r in results.items():
        if r.get("selection"):
            print(f"\nT = {steps}: {selection_line(r['selection'])}; "
                  f"select {r['seconds']['select']:.0f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {str(k): {"ann": v["ann_accuracy"], "snn": v["snn_accuracy"],
                  "fixed": v.get("fixed_accuracy"),
                  "snn_agreement": v["snn_agreement"],
                  "fixed_agreement": v.get("fixed_agreement"),
                  "calibration_seconds": {m: c["seconds"] for m, c in
                                          v["calibration"].items()},
                  "ftbc_target": args.ftbc_target, "seed": args.seed,
                  "neuron": args.neuron,
                  "keep_rule": v["calibration"]["ftbc"]["keep_rule"],
                  "ftbc_fit": args.ftbc_fit,
                  "threshold_scale": v["provenance"]["threshold_scale"],
                  "selection": v.get("selection"),
                  "stage_seconds": v["seconds"],
                  "wall_seconds": v["wall_seconds"], "peak_rss_mib": v["peak_rss_mib"],
                  "resumed": v.get("resumed"),
                  "peak_rss_mib_per_stage": v.get("peak_rss_mib_per_stage"),
                  "kept": {m: {name: layer.get("kept") for name, layer in
                               c.get("layers", {}).items()}
                           for m, c in v["calibration"].items()}}
         for k, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
