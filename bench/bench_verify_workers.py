"""Lava verification with 1 and 2 worker processes (``--verify-workers``), side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_verify_workers.py [--samples 100]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_verify_workers.py \\
        --net OUT/network.net --data cifar10:../shared/data/cifar10 --samples 20 --repeats 1

The demo network (``make demo``: examples/digits_cnn.pt, loihi2-sim, default options) is
built once through the pipeline, or ``--net`` names an exported network (with the
``--data`` it was exported with; its first test samples are used); then
``sims.lava_pool.run_lava_pool`` runs the same samples with 1 and 2 workers, alternating,
``--repeats`` times each. Reported: seconds per sample (wall, build of the runtimes
included) as the median, and that every run's spikes and readout equal the emulator's
(0 mismatches), with the load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def demo_network(out: Path):
    from toolchain.pipeline import Options, run_pipeline
    run = run_pipeline(Options(model=ROOT / "examples" / "digits_cnn.pt", out=out,
                               verify_samples=0, progress=False))
    return run.quant, out / "network.net", run.data.x_test


def exported_network(net: Path, data: str):
    from exporters.netx import read_netx
    from toolchain.data import load_data
    return read_netx(net), net, load_data(data).x_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--net", type=Path, help="an exported network.net (default: the demo's)")
    p.add_argument("--data", help="with --net: the data it was exported with")
    args = p.parse_args()
    if (args.net is None) != (args.data is None):
        p.error("--net and --data go together")
    from sims.emulator import emulate
    from sims.verify import verify
    with tempfile.TemporaryDirectory() as tmp:
        q, net, x_test = (demo_network(Path(tmp)) if args.net is None
                          else exported_network(args.net, args.data))
        x = x_test[:args.samples]
        expected = emulate(q, x, record=True)
        times = {1: [], 2: []}
        for _ in range(args.repeats):
            for workers in times:
                result = verify(q, str(net), x, emulator_result=expected, workers=workers)
                mismatches = result["spike_mismatches"], result["readout_mismatches"]
                assert mismatches == (0, 0), f"{workers} workers: mismatches {mismatches}"
                times[workers].append(result["seconds"] / args.samples)
                print(f"{workers} worker(s): {result['seconds']:.1f} s", flush=True)
    load = os.getloadavg()
    print(f"\nT={q.timesteps}, {args.samples} samples, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}; median of {args.repeats}, 0 mismatches in every run")
    for workers, values in times.items():
        print(f"{workers} worker(s): {statistics.median(values):.3f} s/sample "
              f"(runs: {', '.join(f'{v:.3f}' for v in values)})")
    ratio = statistics.median(times[1]) / statistics.median(times[2])
    print(f"speed-up with 2 workers: {ratio:.2f}x")


if __name__ == "__main__":
    main()
