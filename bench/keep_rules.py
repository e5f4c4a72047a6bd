"""FTBC's keep rules against the authors' loop, on one converted network and its calibration
draw: float accuracy at t = T on validation images (training images outside the draw) and on
the test set.

    OMP_NUM_THREADS=1 .venv/bin/python bench/keep_rules.py --model bench/models/cifar_resnet20.pt \\
        --data cifar10:../shared/data/cifar10 --timesteps 1 --seeds 0 1 2

Per seed, the same converted graph calibrated by
  lp            the pipeline's LP (held-out keep rule per layer)
  ftbc          the pipeline's FTBC (held-out keep rule per layer, the default)
  ftbc network  FTBC keeping every layer's correction (``--keep-rule network``: the final
                held-out guard only)
  ftbc no rule  the same with no held-out part at all (``holdout=0``: nothing can revert)
  authors       ``tests/ftbc_full_forward.py``: the authors' loop (per iteration, batch, layer
                and step one full forward, no held-out rule), on the same calibration batches
and scored on ``--val`` validation images (``bench_validation.validation_split``) and on the
whole test set. Nothing here is chosen on test data; the test column is for the record.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_validation import accuracy, validation_split  # noqa: E402
from tests.ftbc_full_forward import ftbc_full_forward  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.calibrate import calibrate  # noqa: E402
from toolchain.calibration import split_calibration  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402


def variants(run: Run, opts: Options) -> dict:
    """The calibrated graphs of one seed, by name (module docstring)."""
    snn, ann, x = run.snn["converted"], run.ann, run.calib
    settings = pipeline._calibration_settings(opts)
    parts, _ = split_calibration(x, opts.holdout, opts.calib_batches, opts.calib_batch_size,
                                 opts.seed)
    return {
        "lp": lambda: calibrate(snn, ann, x, method="lp", **settings)[0],
        "ftbc": lambda: calibrate(snn, ann, x, method="ftbc", **settings)[0],
        "ftbc network": lambda: calibrate(snn, ann, x, method="ftbc",
                                          **{**settings, "keep": "network"})[0],
        "ftbc no rule": lambda: calibrate(snn, ann, x, method="ftbc",
                                          **{**settings, "keep": "network", "holdout": 0.0})[0],
        "authors": lambda: ftbc_full_forward(snn, ann, parts, alpha=opts.alpha,
                                             iterations=opts.iterations,
                                             step_target=opts.ftbc_target),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--neuron", default="if", choices=("if", "signed"))
    p.add_argument("--val", type=int, default=1000, help="validation images (default 1000)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    base = None
    print("| seed | variant | val | test |\n|---|---|---|---|", flush=True)
    for seed in args.seeds:
        opts = Options(model=args.model, data=args.data, timesteps=args.timesteps,
                       verify_samples=0, progress=False, seed=seed, neuron=args.neuron)
        if base is None:
            base = pipeline.trace(pipeline.load(Run(options=opts)))
        run = pipeline.convert(replace(base, options=opts,
                                       calib=pipeline._calib_data(opts, base.data)))
        xv, yv = validation_split(opts, run.data, args.val)
        xt, yt = run.data.x_test, run.data.y_test
        graphs = {"none": lambda: run.snn["converted"], **variants(run, opts)}
        for name, make in graphs.items():
            g = make()
            print(f"| {seed} | {name} | {accuracy(g, xv, yv):.2f} | {accuracy(g, xt, yt):.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
