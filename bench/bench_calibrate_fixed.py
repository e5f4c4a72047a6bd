"""Integer-domain FTBC (``toolchain.calibrate_fixed``) against "calibrate in float, then quantize".

    .venv/bin/python bench/bench_calibrate_fixed.py --model examples/digits_cnn.pt \\
        --data digits --timesteps 2 4 8 16 --seeds 0 1 2
    .venv/bin/python bench/bench_calibrate_fixed.py --model bench/models/mnist_cnn.pt \\
        --data mnist:/work/shared/data/mnist --eval 2000 --timesteps 2 4 8 16

Per T and seed (the seed picks the calibration subset of the training split, as the pipeline
does; the ANN is fixed): the pipeline's own load / trace / convert / calibrate stages (default
options: mse thresholds, alpha 0.5, 5 x 128 + 20 % holdout, 3 iterations), then normalise and
quantize for ``--target`` and score with the bit-exact emulator on the first ``--eval`` test
images (all by default):

* ``float->q``       : float FTBC, then quantize (the pipeline today);
* ``none->q``        : no calibration, quantize;
* ``none->q->fixed`` : quantize the uncalibrated network, then integer FTBC;
* ``float->q->fixed``: float FTBC, quantize, then integer FTBC on top.

Accuracy after t = T (and the mean over t = 1..T) in percent; nothing is selected on test
data. Results: stdout (markdown) and bench/out/calibrate_fixed_<data>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out"

from exporters.quantize import quantize, validate  # noqa: E402
from hw_targets import get_target  # noqa: E402
from sims.emulator import emulate  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.calibrate_fixed import calibrate_fixed, float_thresholds  # noqa: E402
from toolchain.normalize import normalize  # noqa: E402

COLUMNS = ("float->q", "none->q", "none->q->fixed", "float->q->fixed")


def one(run: pipeline.Run, steps: int, seed: int, n_eval: int | None) -> dict:
    """All four variants at one T and calibration seed."""
    opts = replace(run.options, timesteps=steps, seed=seed)
    run = replace(run, options=opts)
    run = pipeline.calibrate(pipeline.convert(run))
    target = get_target(opts.target)
    x, y = run.data.x_test[:n_eval], run.data.y_test[:n_eval]
    kw = dict(thresholds=float_thresholds(run.snn["converted"]), target=target,
              alpha=opts.alpha, batches=opts.calib_batches, batch_size=opts.calib_batch_size,
              iterations=opts.iterations, holdout=opts.holdout, seed=opts.seed)
    x_calib = pipeline._calib_data(run)  # the very samples the calibrate stage used
    graphs, info = {}, {}
    for method in ("ftbc", "none"):
        q = quantize(normalize(run.snn[method]), target)
        start = time.perf_counter()
        fixed, rep = calibrate_fixed(q, run.ann, x_calib, **kw)
        name = "float" if method == "ftbc" else "none"
        graphs[f"{name}->q"], graphs[f"{name}->q->fixed"] = q, fixed
        info[f"{name}->q->fixed"] = {
            "seconds": time.perf_counter() - start,
            "kept": {k: v["kept"] for k, v in rep["layers"].items()},
            "clamped": {k: v["clamped"] for k, v in rep["layers"].items()},
            "reverted": rep["holdout"].get("reverted"), "violations": len(validate(fixed, target))}
    acc = {k: emulate(g, x, y).accuracy for k, g in graphs.items()}
    return {"T": steps, "seed": seed, "at_T": {k: float(a[-1]) for k, a in acc.items()},
            "mean_t": {k: float(a.mean()) for k, a in acc.items()},
            "float_ftbc_seconds": run.results["calibration"]["ftbc"]["seconds"], "info": info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", default="loihi2")
    p.add_argument("--timesteps", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--eval", type=int, default=None, help="first N test images (default all)")
    args = p.parse_args()
    torch.set_num_threads(1)
    opts = pipeline.Options(model=Path(args.model), target=args.target, data=args.data,
                            verify_samples=0, eval_samples=args.eval, progress=False)
    run = pipeline.trace(pipeline.load(pipeline.Run(options=opts)))
    print(f"ANN accuracy on the evaluation images: {run.results['ann_accuracy']:.2f} %\n")
    print("| T | seed | " + " | ".join(COLUMNS)
          + " | fixed s (none / float) | kept (float->q->fixed) |")
    print("|---|---|" + "---|" * len(COLUMNS) + "---|---|")
    rows = []
    for steps in args.timesteps:
        for seed in args.seeds:
            r = one(run, steps, seed, args.eval)
            rows.append(r)
            cells = " | ".join(f"{r['at_T'][c]:.2f} ({r['mean_t'][c]:.1f})" for c in COLUMNS)
            inf = r["info"]
            kept = "".join("y" if v else "n" for v in inf["float->q->fixed"]["kept"].values())
            print(f"| {steps} | {seed} | {cells} | {inf['none->q->fixed']['seconds']:.1f} / "
                  f"{inf['float->q->fixed']['seconds']:.1f} | {kept} |", flush=True)
    print("\nmean over seeds, accuracy at t = T:")
    for steps in args.timesteps:
        sel = [r for r in rows if r["T"] == steps]
        print(f"| {steps} | " + " | ".join(f"{np.mean([r['at_T'][c] for r in sel]):.2f}"
                                          for c in COLUMNS) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    tag = args.data.split(":")[0]
    (OUT / f"calibrate_fixed_{tag}.json").write_text(json.dumps(
        {"ann_accuracy": run.results["ann_accuracy"], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
