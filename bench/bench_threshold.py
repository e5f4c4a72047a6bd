"""MSE threshold search: ours (``toolchain.convert.threshold_mse``: one sort and prefix sums per
channel, every candidate scored by binary search) against a per-channel grid search written
the straightforward way (``tests.threshold_reference.grid_search_mse``, the reference the
tests check ours against: for every candidate fraction, quantize every value of every
channel and sum the squared error), side by side, median of 3.

    .venv/bin/python bench/bench_threshold.py --model bench/models/cifar_resnet20.pt \\
        --data cifar10:../shared/data/cifar10 --timesteps 4 --samples 800

Both search the same grid (``MSE_FRACTIONS``: f = 1.00, 0.99, ..., 0.05 of the channel max)
on the same float64 values: the ANN activations of every spiking layer on ``--samples``
training images (what ``convert`` searches, 800 = the pipeline's 5 x 128 + 20 %). Timed:
the search alone, over all layers, in one process with one thread; the activations are
computed once, untimed. Reported: seconds each, the ratio, and how many channels got the
same threshold (the two minimise the same sum, so they agree up to float rounding of
near-ties).
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

from tests.threshold_reference import grid_search_mse  # noqa: E402
from toolchain.convert import (_activations, activation_nodes, channel_values,  # noqa: E402
                               threshold_mse)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--samples", type=int, default=800)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    from toolchain.data import load_data
    from toolchain.load import load_model
    from toolchain.trace import trace
    data = load_data(args.data)
    ann = trace(load_model(args.model), tuple(data.x_train.shape[1:]))
    x = data.x_train[np.sort(np.random.default_rng(0).permutation(
        len(data.x_train))[:args.samples])]
    names = [n.name for n in activation_nodes(ann)]
    acts = _activations(ann, x, names, 128)
    values = {n: channel_values(a).double() for n, a in acts.items()}
    del acts
    offset = 0.5  # v_init 0.5, no input shift: the pipeline's default
    times: dict[str, list[float]] = {"ours": [], "grid": []}
    results = {}
    for _ in range(args.repeats):
        for kind, fn in (("ours", threshold_mse), ("grid", grid_search_mse)):
            start = time.perf_counter()
            results[kind] = {n: fn(v, args.timesteps, offset) for n, v in values.items()}
            times[kind].append(time.perf_counter() - start)
            print(f"{kind}: {times[kind][-1]:.2f} s", file=sys.stderr, flush=True)
    chans = sum(v.shape[0] for v in values.values())
    same = sum(int((results["ours"][n] == results["grid"][n]).sum()) for n in values)
    close = sum(int(torch.isclose(results["ours"][n], results["grid"][n], rtol=1e-12).sum())
                for n in values)
    ours, grid = statistics.median(times["ours"]), statistics.median(times["grid"])
    load = os.getloadavg()
    print(f"{args.model.name}, T={args.timesteps}, {args.samples} samples, {len(values)} layers, "
          f"{chans} channels, {sum(v.numel() for v in values.values()):,} values; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"ours {ours:.2f} s, grid {grid:.2f} s (median of {args.repeats}): "
          f"{grid / ours:.1f}x; same threshold in {same}/{chans} channels "
          f"({close} equal to 1e-12)")


if __name__ == "__main__":
    main()
