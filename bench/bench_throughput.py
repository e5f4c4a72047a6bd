"""Simulation throughput on any model: float SNN, bit-exact emulator and Lava (1 and 2 worker
processes), in samples x steps per second, side by side in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_throughput.py \\
        --model bench/models/cifar_resnet20.pt --data cifar10:../shared/data/cifar10 \\
        --timesteps 8 --samples 256 --lava-samples 4 --repeats 3

The network is built once through the real pipeline (``--target``, default loihi2-sim; calibration
cut to one batch and one iteration, ``--eval-samples 64``: its cost does not change the
simulations'); then on the first ``--samples`` test images, alternating, ``--repeats``
times: ``sims.torch_snn.simulate`` on the FTBC graph and ``sims.emulator.emulate`` on the
quantized one (batch 256, one thread); and on ``--lava-samples`` images
``sims.lava_pool.run_lava_pool`` with 1 and 2 workers (wall time, runtime build included),
each run checked spike for spike against the emulator (0 mismatches asserted). Medians and
the load average are printed; ``--lava-samples 0`` skips Lava.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(args, out: Path):
    from toolchain.pipeline import Options, run_pipeline
    run = run_pipeline(Options(model=args.model, data=args.data, out=out, target=args.target,
                               timesteps=args.timesteps, calib_batches=1, iterations=1,
                               eval_samples=64, verify_samples=0, progress=False))
    return run, out / "network.net"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, default=8)
    p.add_argument("--target", default="loihi2-sim",
                   help="loihi2 for networks Lava cannot run yet (with --lava-samples 0)")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--lava-samples", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    from sims.emulator import emulate
    from sims.torch_snn import simulate
    from sims.verify import verify
    times: dict[str, list[float]] = {"float SNN": [], "emulator": [], "lava 1 worker": [],
                                     "lava 2 workers": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run, net = build(args, Path(tmp))
        print(f"built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        q, snn, steps = run.quant, run.snn["ftbc"], args.timesteps
        x = run.data.x_test[:args.samples]
        xl = run.data.x_test[:args.lava_samples]
        expected = emulate(q, xl, record=True) if len(xl) else None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            simulate(snn, x)
            times["float SNN"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            emulate(q, x)
            times["emulator"].append(time.perf_counter() - t0)
            for workers in (1, 2) if len(xl) else ():
                result = verify(q, str(net), xl, emulator_result=expected, workers=workers)
                assert (result["spike_mismatches"], result["readout_mismatches"]) == (0, 0), \
                    workers
                times[f"lava {workers} worker" + ("s" if workers > 1 else "")].append(
                    result["seconds"])
            print({k: round(v[-1], 2) for k, v in times.items() if v}, file=sys.stderr,
                  flush=True)
    load = os.getloadavg()
    neurons = sum(int(np.prod(layer.shape)) for layer in q.layers)
    print(f"{args.model.name}: T={steps}, {neurons:,} neurons, float/emulator on "
          f"{len(x)} samples, Lava on {len(xl)}; median of {args.repeats}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| simulator | samples | median s | samples x steps / s | s / sample |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        if not values:
            continue
        n = len(xl) if name.startswith("lava") else len(x)
        med = statistics.median(values)
        print(f"| {name} | {n} | {med:.2f} | {n * steps / med:,.1f} | {med / n:.3f} |")


if __name__ == "__main__":
    main()
