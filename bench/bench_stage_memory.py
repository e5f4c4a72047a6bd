"""Peak RSS and seconds of the pipeline's first stages (load, trace, convert by default), as
the CLI runs them, plus a hash of every threshold: for before/after comparisons of one stage
with two trees (the tree first on ``PYTHONPATH`` decides which code runs).

    OMP_NUM_THREADS=1 PYTHONPATH=TREE .venv/bin/python bench/bench_stage_memory.py \\
        --model bench/models/cifar_vgg16.pt --data cifar10:../shared/data/cifar10 --timesteps 4
"""
from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3, help="how many stages to run (default 3: "
                   "load, trace, convert)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from toolchain import pipeline
    from toolchain.pipeline import Options, Run
    with tempfile.TemporaryDirectory() as out:
        run = Run(options=Options(model=args.model, data=args.data, out=Path(out),
                                  target="loihi2", timesteps=args.timesteps, eval_samples=64,
                                  verify_samples=0, progress=False))
        for stage in pipeline.STAGES[:args.stages]:
            run = stage(run)
    print("code:", pipeline.__file__)
    print("peak RSS MiB:", {k: round(v / 2**20) for k, v in run.peak_rss.items()})
    print("seconds:", {k: round(v, 1) for k, v in run.timings.items()})
    if run.snn:
        layers = next(iter(run.snn.values())).layers
        digest = hashlib.sha256(b"".join(np.asarray(l.threshold).tobytes() for l in layers))
        print("thresholds sha256:", digest.hexdigest()[:16])


if __name__ == "__main__":
    main()
