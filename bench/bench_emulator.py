"""Emulator speed: bit-exact emulator vs integer reference vs float SNN simulator.

    .venv/bin/python bench/bench_emulator.py [--samples 512] [--timesteps 32] [--repeats 3]
                                             [--full] [--full-float] [--random]
                                             [--model PATH] [--threads N]

Network: the trained MnistNet (bench/models/mnist_cnn.pt, TorchScript) loaded, traced,
converted (thresholds from 1024 training images, no FTBC calibration: it does not change the
cost) and normalised; with ``--random`` or when that fails, ``tests.qgraph_builders.
mnist_like_snn`` (same shape, random weights). Both paths quantize for loihi2.

Throughput (samples x steps per second, median of ``repeats``) on the first ``samples`` test
images for the emulator and ``sims.torch_snn.simulate`` (skipped if that module is missing),
and on 2 images for ``sims.reference`` (pure numpy, one sample at a time), all in one run;
the emulator is checked equal to the reference on those images. ``--full`` also times
scoring the 10,000-image MNIST test set at T = ``timesteps``. Results: stdout and
bench/results_emulator.md. Wall-clock on a shared machine: compare the ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters.quantize import quantize, validate  # noqa: E402
from hw_targets import get_target  # noqa: E402
from sims.emulator import emulate  # noqa: E402
from sims.reference import encode_input, reference_run  # noqa: E402

MNIST = Path("/work/shared/data/mnist")
MODEL = ROOT / "bench" / "models" / "mnist_cnn.pt"


def mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """x (N, 1, 28, 28) float32 in [0, 1], y (N,)."""
    data = np.load(MNIST / f"mnist_{split}.npz")
    return (data["x"].astype(np.float32) / 255.0)[:, None], data["y"].astype(np.int64)


def trained_snn(path: Path, timesteps: int):
    """Load, trace, convert and normalise the trained model (no calibration)."""
    from toolchain.convert import convert
    from toolchain.load import load_model
    from toolchain.normalize import normalize
    from toolchain.trace import trace
    x_train, _ = mnist("train")
    ann = trace(load_model(path), (1, 28, 28))
    return normalize(convert(ann, x_train[:1024], timesteps=timesteps))


def network(args) -> tuple[object, str]:
    """(normalised SnnGraph, description)."""
    if not args.random:
        try:
            return trained_snn(args.model, args.timesteps), f"trained {args.model.name}"
        except Exception as exc:  # report and fall back: the bench is about speed
            print(f"# trained model unavailable ({type(exc).__name__}: {exc}); random weights")
    from tests.qgraph_builders import mnist_like_snn
    return mnist_like_snn(0, args.timesteps), "MnistNet shape, random weights"


def timed(fn, repeats: int) -> float:
    """Median wall time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def float_simulator():
    """``sims.torch_snn.simulate`` or None when that module does not exist yet."""
    try:
        from sims.torch_snn import simulate
        return simulate
    except ImportError:
        return None


def reference_check(q, x: np.ndarray) -> float:
    """Seconds per sample of the reference; asserts the emulator equals it exactly."""
    res = emulate(q, x, record=True)
    x_int = encode_input(q.input, x)
    start = time.perf_counter()
    for i in range(len(x)):
        ref = reference_run(q, x_int[i])
        for layer in q.layers:
            got = res.readout_trace[i] if layer.readout else res.spikes[layer.name][:, i]
            np.testing.assert_array_equal(got, ref[layer.name])
    return (time.perf_counter() - start) / len(x)


def throughput(snn, q, x, y, args) -> list[tuple[str, float]]:
    """(name, samples x steps per second) rows."""
    work = len(x) * args.timesteps
    rows = [("emulator (bit-exact, int)",
             work / timed(lambda: emulate(q, x, y, batch_size=args.batch_size), args.repeats))]
    simulate = float_simulator()
    if simulate is None:
        rows.append(("float SNN (sims.torch_snn)", float("nan")))
    else:
        rows.append(("float SNN (sims.torch_snn)",
                     work / timed(lambda: simulate(snn, x, y), args.repeats)))
    rows.append(("integer reference (numpy)", args.timesteps / reference_check(q, x[:2])))
    return rows


def full_test_set(snn, q, args) -> list[str]:
    """Markdown lines: seconds and accuracy for the 10k test set."""
    x, y = mnist("test")
    start = time.perf_counter()
    res = emulate(q, x, y, batch_size=args.batch_size)
    secs = time.perf_counter() - start
    lines = [f"| emulator, 10,000 images, T={args.timesteps} | {secs:.1f} s | "
             f"{res.accuracy[-1]:.2f} % | saturations {dict(res.saturations)} |"]
    simulate = float_simulator()
    if simulate is not None and args.full_float:
        start = time.perf_counter()
        acc = simulate(snn, x, y).accuracy[-1]
        lines.append(f"| float SNN, 10,000 images, T={args.timesteps} | "
                     f"{time.perf_counter() - start:.1f} s | {acc:.2f} % | |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--timesteps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--full", action="store_true", help="also score the 10k test set")
    p.add_argument("--full-float", action="store_true", help="with --full: float SNN too")
    p.add_argument("--random", action="store_true", help="random MnistNet-shaped weights")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is steadier on a shared machine)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    snn, what = network(args)
    q = quantize(snn, get_target("loihi2"))
    x, y = mnist("test")
    x, y = x[:args.samples], y[:args.samples]
    rows = throughput(snn, q, x, y, args)
    emu = rows[0][1]
    lines = [f"# Emulator benchmark ({what}, T={args.timesteps}, {args.samples} test images, "
             f"median of {args.repeats}, torch threads {torch.get_num_threads()}, "
             f"load avg {os.getloadavg()[0]:.1f})", "",
             f"loihi2 violations: {len(validate(q, get_target('loihi2')))}", "",
             "| simulator | samples x steps / s | emulator speed-up |", "|---|---|---|"]
    lines += [f"| {name} | {rate:,.0f} | {emu / rate:.2f}x |" for name, rate in rows]
    if args.full:
        lines += ["", "| run | time | accuracy (t=T) | |", "|---|---|---|---|"]
        lines += full_test_set(snn, q, args)
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "results_emulator.md").write_text(text)


if __name__ == "__main__":
    main()
