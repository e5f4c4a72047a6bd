"""Conversion / calibration options compared on *validation* data (issue 16 item 5).

Each variant converts the model (threshold method, percentile, v_init) and calibrates it
(none / lp / ftbc with its held-out keep rule, iterations, calibration images), then scores the
float SNN at t = T on ``--val`` training images that the calibration never saw: the pipeline
draws its calibration images as the first ``need`` of a seeded permutation of the training
split (``toolchain.pipeline._calib_data``); the validation images are the next ``--val`` of
the same permutation. No test image is used, so the options can be chosen here without
selecting on test data. ``--seeds`` repeats every cell with other calibration seeds (the seed
draws the calibration images and so the validation images after them: every variant of one
seed sees the same images). Output: one markdown row per seed, T and variant; with several
variants, then each variant minus the first, paired per seed, with the mean and sd.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_validation.py \\
        --model bench/models/cifar_resnet20.pt --data cifar10:../shared/data/cifar10 \\
        --timesteps 4 --val 1000 --variants base threshold=percentile:99.9 holdout=0 \\
        --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sims.torch_snn import simulate  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.ann import ann_predictions  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402

VAL_START = 4096  # validation images start here in the permutation (after any calibration draw)
# (no seed here: it draws the validation images too; --seeds sets it for all variants at once)
FIELDS = {"threshold": str, "percentile": float, "v_init": float, "holdout": float,
          "iterations": int, "calib_batches": int, "alpha": float,
          "ftbc_target": str, "ftbc_fit": str, "neuron": str,
          "keep_rule": lambda v: tuple(v.split("/")),
          "threshold_scale": lambda v: tuple(float(s) for s in v.split("/"))}


def parse_variant(text: str) -> dict:
    """``base`` or ``key=value[,key=value]``; ``threshold=percentile:99.9`` sets both;
    ``threshold_scale=1/1.15/1.3``, ``keep_rule=layer/network``: several values, the
    pipeline's ``select`` keeps one (of each)."""
    if text == "base":
        return {}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key == "threshold" and ":" in value:
            value, pct = value.split(":")
            out["percentile"] = float(pct)
        if key not in FIELDS:
            raise SystemExit(f"unknown variant field {key!r}: use {sorted(FIELDS)}")
        out[key] = FIELDS[key](value)
    return out


def validation_split(opts: Options, data, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training images after the calibration images in the pipeline's permutation."""
    need = min(pipeline._calib_count(opts), len(data.x_train))
    if len(opts.threshold_scale) * len(opts.keep_rule) > 1:  # select's images come next
        need += pipeline.SELECTION_SAMPLES
    if need > VAL_START:
        raise SystemExit(f"{need} calibration (and selection) images: at most {VAL_START} here")
    order = pipeline._training_order(opts, data)
    idx = np.sort(order[VAL_START:VAL_START + n])  # the same images for every variant
    return data.x_train[idx], data.y_train[idx]


def accuracy(graph, x: np.ndarray, y: np.ndarray) -> float:
    """The float SNN's accuracy (%) at t = T."""
    return 100.0 * float((simulate(graph, x).predictions[-1] == y).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, nargs="+", default=[4])
    p.add_argument("--val", type=int, default=1000, help="validation (training) images")
    p.add_argument("--variants", nargs="+", default=["base"],
                   help="'base' or key=value[,key=value] over " + ", ".join(FIELDS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="calibration seeds (each draws its own validation images too)")
    args = p.parse_args()
    print("| seed | T | variant | ANN (val) | none | lp | ftbc | ftbc kept layers "
          "| convert+calib s |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_run, ann, ann_acc, scores = None, None, {}, {}
    for seed, steps, text in ((s, t, v) for s in args.seeds for t in args.timesteps
                              for v in args.variants):
        torch.manual_seed(0)
        opts = Options(model=Path(args.model), data=args.data, timesteps=steps,
                       verify_samples=0, progress=False, seed=seed, **parse_variant(text))
        if base_run is None:
            base_run = pipeline.load(Run(options=opts))
            from toolchain.trace import trace as trace_model
            ann = trace_model(base_run.loaded, tuple(base_run.data.x_train.shape[1:]))
        run = replace(base_run, options=opts, calib=pipeline._calib_data(opts, base_run.data),
                      ann=ann)
        x_val, y_val = validation_split(opts, run.data, args.val)
        if seed not in ann_acc:
            ann_acc[seed] = 100.0 * float((ann_predictions(ann, x_val) == y_val).mean())
        start = time.perf_counter()
        run = pipeline.calibrate(pipeline.convert(pipeline.select(run)))
        seconds = time.perf_counter() - start
        acc = {m: accuracy(run.snn[m], x_val, y_val) for m in pipeline.CALIBRATION_METHODS}
        kept = run.results["calibration"]["ftbc"].get("layers", {})
        n_kept = sum(bool(v.get("kept")) for v in kept.values())
        scores[seed, steps, text] = acc
        chosen = run.results.get("selection")
        shown = (f"{text} (chose {run.threshold_scale:g}, {run.keep_rule})" if chosen
                 else text)
        print(f"| {seed} | {steps} | {shown} | {ann_acc[seed]:.2f} | {acc['none']:.2f} "
              f"| {acc['lp']:.2f} | {acc['ftbc']:.2f} | {n_kept}/{len(kept)} | {seconds:.0f} |",
              flush=True)
    print_differences(scores, args.seeds, args.timesteps, args.variants)


def print_differences(scores: dict, seeds: list[int], steps: list[int],
                      variants: list[str]) -> None:
    """Each variant minus the first, paired per seed (same calibration and validation images):
    the per-seed differences, their mean and sample standard deviation, for lp and ftbc."""
    if len(variants) < 2:
        return
    first = variants[0]
    print(f"\n| T | variant | method | minus {first}, seeds {' / '.join(map(str, seeds))} "
          "| mean | sd |")
    print("|---|---|---|---|---|---|")
    for t in steps:
        for text in variants[1:]:
            for method in ("lp", "ftbc"):
                d = np.array([scores[s, t, text][method] - scores[s, t, first][method]
                              for s in seeds])
                sd = f"{d.std(ddof=1):.2f}" if len(d) > 1 else "-"
                print(f"| {t} | {text} | {method} | {' / '.join(f'{x:+.1f}' for x in d)} "
                      f"| {d.mean():+.2f} | {sd} |")


if __name__ == "__main__":
    main()
