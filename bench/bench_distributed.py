"""Data-parallel scale-out: the real CLI on MNIST with 1 rank and with N ranks (torchrun on
127.0.0.1, gloo), side by side in one run.

    .venv/bin/python bench/bench_distributed.py [--ranks 2] [--repeats 3] [--timesteps 8]

Each repeat runs three configurations back to back (rotating which goes first), each as a
fresh process tree: ``python -m toolchain.cli`` with torch's default threads (one rank using
every core), the same with one thread (``OMP_NUM_THREADS=1``: the unit that data
parallelism multiplies), and ``torchrun --nproc-per-node N -m toolchain.cli`` (torchrun gives
each rank one thread).
Same arguments (target loihi2-sim, Lava verification off: it runs on rank 0 alone either
way). Per configuration: the median over repeats of the wall time and of the stage seconds
in report.json (convert = threshold statistics, calibrate = lp + ftbc, simulate = float SNN
evaluation of none / lp / ftbc, calibrate_fixed = integer FTBC, emulate = fixed-point
evaluation), and whether every run wrote the same network.net bytes.
Results: stdout (markdown) and bench/out/distributed.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
STAGES = ("load", "convert", "calibrate", "simulate", "calibrate_fixed", "emulate", "netlist")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIGS = ("1 rank", "1 rank, 1 thread", "N ranks")


def _command(ranks: int, out: Path, args: argparse.Namespace) -> list[str]:
    cli = ["-m", "toolchain.cli", str(args.model), "--data", args.data, "--target",
           "loihi2-sim", "--timesteps", str(args.timesteps), "--verify-samples", "0",
           "--calib-batches", "5", "--calib-batch-size", "128", "--iterations", "3",
           "--no-progress", "--out", str(out)]
    if args.eval_samples:
        cli += ["--eval-samples", str(args.eval_samples)]
    if ranks == 1:
        return [sys.executable, *cli]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *cli]


def _once(config: str, args: argparse.Namespace) -> dict:
    ranks = args.ranks if config == "N ranks" else 1
    out = OUT / f"distributed-{CONFIGS.index(config)}"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS")}
    if config == "1 rank, 1 thread":
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(_command(ranks, out, args), cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "seconds": report["seconds"],
            "fixed_accuracy_T": report["fixed_accuracy"][-1],
            "ftbc_accuracy_T": report["snn_accuracy"]["ftbc"][-1],
            "net_sha256": hashlib.sha256((out / "network.net").read_bytes()).hexdigest()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="N")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timesteps", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=None, help="default: all 10,000")
    p.add_argument("--model", type=Path, default=ROOT / "bench" / "models" / "mnist_cnn.pt")
    p.add_argument("--data", default=f"mnist:{ROOT.parent / 'shared' / 'data' / 'mnist'}")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    runs = {c: [] for c in CONFIGS}
    for i in range(args.repeats):
        for config in CONFIGS[i % 3:] + CONFIGS[:i % 3]:
            runs[config].append(_once(config, args))
            print(f"repeat {i + 1}, {config}: {runs[config][-1]['wall']:.1f} s",
                  file=sys.stderr, flush=True)
    med = {r: {"wall": statistics.median(x["wall"] for x in rs),
               **{s: statistics.median(x["seconds"].get(s, 0.0) for x in rs) for s in STAGES}}
           for r, rs in runs.items()}
    same = len({x["net_sha256"] for rs in runs.values() for x in rs}) == 1
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
              "median": med, "identical_network_net": same, "cpus": os.cpu_count()}
    (OUT / "distributed.json").write_text(json.dumps(result, indent=2))
    one, single, many = (med[c] for c in CONFIGS)
    print(f"| stage | 1 rank, {os.cpu_count()} threads (s) | 1 rank, 1 thread (s) | "
          f"{args.ranks} ranks x 1 thread (s) | speed-up vs 1 rank | vs 1 rank, 1 thread |")
    print("|---|---|---|---|---|---|")
    for key in (*STAGES, "wall"):
        r1 = one[key] / many[key] if many[key] else float("nan")
        r2 = single[key] / many[key] if many[key] else float("nan")
        print(f"| {key} | {one[key]:.1f} | {single[key]:.1f} | {many[key]:.1f} | {r1:.2f}x "
              f"| {r2:.2f}x |")
    acc = {r: (rs[0]["ftbc_accuracy_T"], rs[0]["fixed_accuracy_T"]) for r, rs in runs.items()}
    print(f"\nfloat FTBC / fixed-point accuracy at t=T: {acc}; network.net identical in "
          f"every run: {same}; {os.cpu_count()} CPUs, median of {args.repeats}")


if __name__ == "__main__":
    main()
