"""Calibration benchmarks: cost of our cached FTBC vs the authors' loop structure, and
accuracy of none / lp / ftbc against T.

    .venv/bin/python bench/bench_calibration.py timing   [--timesteps 32] [--repeats 3]
        [--model bench/models/cifar_resnet20.pt --data cifar10:../shared/data/cifar10
         --batches 1 --iterations 1]
    .venv/bin/python bench/bench_calibration.py accuracy [--seeds 3] [--model PATH]

timing: a 6-spiking-layer CNN trained on digits (seeded); ``calibrate(method="ftbc")`` (layer
by layer on cached upstream spike trains, holdout rule included) against
``ftbc_full_forward`` (the authors' loop: per batch, layer and step one ANN forward and one
whole-network SNN step = L x T full forwards; same math, no holdout). Same batches (5 x 128),
alpha 0.5, 3 iterations. Each run is a fresh child process (alternating); memory is the
child's peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which sees torch's allocator;
tracemalloc would miss tensor memory) minus that of a ``baseline`` child that does the same
set-up without calibrating. Median of ``repeats`` runs each.

accuracy: test-set accuracy at t = T of none / lp / ftbc for T in {1, 2, 4, 8, 16, 32}, with
``--seeds`` deep CNNs trained on a seeded 80/20 digits split, or with ``--model`` (TorchScript,
e.g. bench/models/mnist_cnn.pt with ``--data mnist:DIR``) on ``--seeds`` calibration seeds:
seed s draws the pipeline's calibration subset and held-out split (``ftbc-export --seed s``).
Calibration data: 800 training samples (5 x 128 + 20 % holdout); nothing is selected on the
test split. The table gives the mean over seeds, and ftbc - lp per seed (paired: both
calibrations see the same subset and thresholds), since single runs differ by a few images.
Results go to stdout (markdown) and bench/out/*.json.

    .venv/bin/python bench/bench_calibration.py accuracy --model bench/models/mnist_cnn.pt \\
        --data mnist:../shared/data/mnist --seeds 3 --steps 1 2 4 8 16 32 64
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"

from toolchain.ann import ann_accuracy  # noqa: E402
from tests.ftbc_full_forward import ftbc_full_forward  # noqa: E402
from toolchain.calibrate import calibrate, split_calibration  # noqa: E402
from toolchain.convert import convert  # noqa: E402
from sims.torch_snn import simulate  # noqa: E402

CALIB = dict(alpha=0.5, batches=5, batch_size=128, iterations=3, holdout=0.2, seed=0)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _digits_model(seed: int):
    from tests.ann_builders import deep_cnn, train_digits_cnn
    return train_digits_cnn(deep_cnn, seed=seed, epochs=40)


def _calib_set(x_train: np.ndarray, seed: int) -> np.ndarray:
    return x_train[np.sort(np.random.default_rng(seed).permutation(len(x_train))[:800])]


# --------------------------------------------------------------------------- timing

def _child(kind: str, setup_path: Path) -> dict:
    """One measured calibration in this (fresh) process."""
    torch.set_num_threads(1)
    ann, snn, x_calib, calib = pickle.loads(setup_path.read_bytes())
    parts, _ = split_calibration(x_calib, calib["holdout"], calib["batches"],
                                 calib["batch_size"], calib["seed"])
    start = time.perf_counter()
    if kind == "ours":
        calibrate(snn, ann, x_calib, method="ftbc", **calib)
    elif kind == "ours_no_holdout_rule":
        calibrate(snn, ann, x_calib, method="ftbc", **{**calib, "holdout": 0.0})
    elif kind == "ours_solve":
        calibrate(snn, ann, x_calib, method="ftbc", fit="solve", **calib)
    elif kind == "full_forward":
        ftbc_full_forward(snn, ann, parts, alpha=calib["alpha"],
                          iterations=calib["iterations"])
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": _rss_mb()}


KINDS = ("baseline", "ours", "ours_no_holdout_rule", "full_forward", "ours_solve")


def timing(timesteps: int, repeats: int, model: Path | None = None, spec: str = "digits",
           batches: int = 5, iterations: int = 3, batch_size: int = 128,
           kinds: tuple[str, ...] = KINDS[:4]) -> dict:
    """Side by side, alternating, in fresh children: ours with and without the keep rule,
    the full-forwards loop, ours with ``fit="solve"`` (``kinds`` picks among them), and a
    baseline child (set-up only) for the memory figure. ``model``: a TorchScript model on
    ``spec`` data (default: the seeded digits CNN)."""
    torch.set_num_threads(1)
    calib = {**CALIB, "batches": batches, "iterations": iterations, "batch_size": batch_size}
    if model is None:
        ann, data = _digits_model(0)
    else:
        ann, data = _load_model(model, spec)
    need = int(np.ceil(batches * calib["batch_size"] / (1 - calib["holdout"])))
    x_calib = data.x_train[np.sort(np.random.default_rng(0).permutation(
        len(data.x_train))[:need])]
    snn = convert(ann, x_calib, timesteps=timesteps)
    OUT.mkdir(parents=True, exist_ok=True)
    setup = OUT / f"timing_setup_T{timesteps}.pkl"
    setup.write_bytes(pickle.dumps((ann, snn, x_calib, calib)))
    runs: dict[str, list[dict]] = {kind: [] for kind in ("baseline", *kinds)}
    for _ in range(repeats):
        for kind in runs:
            cmd = [sys.executable, __file__, "_child", kind, str(setup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            runs[kind].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{kind}: {runs[kind][-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    setup.unlink()
    spiking = sum(not l.readout for l in snn.layers)
    result = {"model": str(model or "digits deep CNN"), "timesteps": timesteps,
              "spiking_layers": spiking, "neurons": int(sum(np.prod(l.shape) for l in snn.layers)),
              "repeats": repeats, **calib, "load_average": os.getloadavg(), "runs": runs}
    base_rss = statistics.median(r["peak_rss_mb"] for r in runs["baseline"])
    for kind in kinds:
        result[f"{kind}_median_s"] = statistics.median(r["seconds"] for r in runs[kind])
        result[f"{kind}_peak_rss_over_baseline_mb"] = statistics.median(
            r["peak_rss_mb"] for r in runs[kind]) - base_rss
    for kind, key in (("ours", "speedup"), ("ours_no_holdout_rule", "speedup_no_holdout_rule")):
        if kind in runs and "full_forward" in runs:
            result[key] = result["full_forward_median_s"] / result[f"{kind}_median_s"]
    if "ours" in runs and "ours_solve" in runs:  # per repeat, side by side, then the median
        result["solve_over_sweep"] = statistics.median(
            a["seconds"] / b["seconds"] for a, b in zip(runs["ours_solve"], runs["ours"]))
    return result


# --------------------------------------------------------------------------- accuracy

def _load_model(path: Path, spec: str):
    from toolchain.data import load_data
    from toolchain.load import load_model
    from toolchain.trace import trace
    data = load_data(spec)
    return trace(load_model(path), tuple(data.x_train.shape[1:])), data


def accuracy(seeds: int, model: Path | None, steps: list[int], spec: str) -> dict:
    """Seed s: the s-th trained digits model, or ``model`` with calibration seed s."""
    table: dict = {"ann": [], "rows": {}, "kept": {}}
    fixed = _load_model(model, spec) if model else None
    for seed in range(seeds):
        ann, data = fixed if fixed else _digits_model(seed)
        table["ann"].append(ann_accuracy(ann, data.x_test, data.y_test))
        x_calib = _calib_set(data.x_train, seed)
        for T in steps:
            snn = convert(ann, x_calib, timesteps=T)
            for method in ("none", "lp", "ftbc"):
                new, rep = calibrate(snn, ann, x_calib, method=method, **{**CALIB, "seed": seed})
                acc = simulate(new, data.x_test, data.y_test).accuracy[-1]
                table["rows"].setdefault(f"{T}/{method}", []).append(float(acc))
                table["kept"].setdefault(f"{T}/{method}", []).append(
                    "".join("1" if r.get("kept") else "0" for r in rep["layers"].values()))
                print(f"seed {seed} T {T} {method}: {acc:.2f} ({rep['seconds']:.1f} s)",
                      file=sys.stderr, flush=True)
    return table


def _markdown(table: dict, steps: list[int]) -> str:
    n = len(table["ann"])
    lines = [f"ANN: {np.mean(table['ann']):.2f} (mean of {n})", "",
             "| T | none | lp | ftbc | ftbc - lp per seed (points) |", "|---|---|---|---|---|"]
    for T in steps:
        rows = {m: np.asarray(table["rows"][f"{T}/{m}"]) for m in ("none", "lp", "ftbc")}
        cells = [f"{rows[m].mean():.2f}" for m in ("none", "lp", "ftbc")]
        diff = " ".join(f"{d:+.2f}" for d in rows["ftbc"] - rows["lp"])
        lines.append(f"| {T} | " + " | ".join(cells) + f" | {diff} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_child":
        print(json.dumps(_child(argv[1], Path(argv[2]))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=("timing", "accuracy"))
    p.add_argument("--timesteps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--data", default="digits", help="data for --model (default digits)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--batches", type=int, default=CALIB["batches"],
                   help="timing: calibration batches of 128 (fewer for big models)")
    p.add_argument("--iterations", type=int, default=CALIB["iterations"],
                   help="timing: FTBC iterations")
    p.add_argument("--batch-size", type=int, default=CALIB["batch_size"],
                   help="timing: calibration batch size")
    p.add_argument("--kinds", nargs="+", choices=KINDS[1:], default=list(KINDS[1:4]),
                   help="timing: what to time beside the baseline child (ours_solve: "
                        "ours with --ftbc-fit solve)")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.mode == "timing":
        result = timing(args.timesteps, args.repeats, args.model, args.data, args.batches,
                        args.iterations, args.batch_size, tuple(args.kinds))
        stem = f"_{args.model.stem}" if args.model else ""
        (OUT / f"calibration_timing{stem}_T{args.timesteps}.json").write_text(
            json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    else:
        table = accuracy(args.seeds, args.model, args.steps, args.data)
        name = "calibration_accuracy" + (f"_{args.model.stem}" if args.model else "")
        (OUT / f"{name}.json").write_text(json.dumps(table, indent=1))
        print(_markdown(table, args.steps))


if __name__ == "__main__":
    main(sys.argv[1:])
