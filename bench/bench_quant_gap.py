"""Where does the fixed-point network lose accuracy against the float FTBC network?

Runs the pipeline up to quantization (convert, float FTBC, normalise, quantize for the target;
no integer FTBC) and scores on the same test subset at t = T:

* ``float``: the normalised float SNN (FTBC's schedules), what quantization starts from;
* ``w``: the same float SNN with every synapse's weights replaced by what the QuantGraph
  holds, dequantized (``W' = mant * sigma * 2**weight_exp * 2**act_shift / scale[c]``): the
  weight rounding alone;
* ``w+b``: also the biases and v_init dequantized (bias_mant * 2**bias_exp / scale[c]);
* ``emulator``: the integer network itself (``sims.emulator``, bit-exact with Lava), which adds
  the 24-bit state and the integer input encoding;
* ``w, own scale``: the weights rounded with each synapse's own per-channel scale (the largest
  that keeps that synapse's mantissas in 8 bits) instead of the neuron's common one: what a
  per-synapse weight exponent could recover where one synapse (e.g. a residual shortcut) sets
  the scale for all (an upper bound: the exponent is a power of two, this is not), and the
  readout's weights without the scale limit of its provable T-step accumulation bound;
* ``w, readout at 8 bits``: every weight as quantized except the readout's, as in the column
  before: what the readout's accumulation limit alone costs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_quant_gap.py \\
        --model bench/models/cifar_resnet20_qcfs_l4.pt2 --data cifar10:../shared/data/cifar10 \\
        --timesteps 16 --eval-samples 2000
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.ir import evolve  # noqa: E402
from exporters.quantize import (per_row, quantize_weight, source_units,  # noqa: E402
                               weight_scale_limit)
from hw_targets import get_target  # noqa: E402
from sims.emulator import emulate  # noqa: E402
from sims.torch_snn import simulate  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.calibrate import calibrate  # noqa: E402
from toolchain.calibration import STEP_TARGETS  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402


def float_weight(weight, weight_exp, sigma, scale, target):
    """An integer synapse weight (mantissa x 2, torch layout) back in float units."""
    return np.asarray(weight * (sigma * 2.0 ** weight_exp * (1 << target.act_shift))
                      / per_row(scale, weight.ndim), np.float64)


def dequantized(snn, q, target, *, biases: bool):
    """``snn`` (normalised) with the QuantGraph's weights (and biases, v_init) in float."""
    sigma, _ = source_units(snn, q.input, tuple(q.meta["input_range"]))
    layers = []
    for layer, ql in zip(snn.layers, q.layers):
        scale = np.asarray(ql.scale, np.float64)
        syns = tuple(evolve(s, weight=float_weight(qs.weight, qs.weight_exp, sigma[s.source],
                                                   scale, target))
                     for s, qs in zip(layer.synapses, ql.synapses))
        changes = {"synapses": syns}
        if biases:
            b = ql.bias_mant * 2.0 ** ql.bias_exp / scale[None, :]
            base = np.broadcast_to(np.asarray(layer.bias, np.float64), (layer.channels,))
            changes["bias_schedule"] = b - base[None, :]
            changes["v_init"] = np.asarray(ql.v_init, np.float64) / scale
        layers.append(evolve(layer, **changes))
    return evolve(snn, layers=tuple(layers))


def own_scale(snn, q, target):
    """Weights rounded (``quantize_weight``) at each synapse's own per-channel scale, the
    largest that keeps its mantissas in 8 bits."""
    sigma, _ = source_units(snn, q.input, tuple(q.meta["input_range"]))
    layers = []
    for layer in snn.layers:
        syns = []
        for s in layer.synapses:
            scale = np.floor(np.minimum(weight_scale_limit(s.weight, sigma[s.source], target),
                                        2.0 ** 40))
            w = quantize_weight(s.weight, scale, sigma[s.source], target)
            syns.append(evolve(s, weight=float_weight(w, 0, sigma[s.source], scale, target)))
        layers.append(evolve(layer, synapses=tuple(syns)))
    return evolve(snn, layers=tuple(layers))


def readout_at_8_bits(snn, q, target):
    """Every weight as quantized except the readout's, rounded at its own 8-bit scale
    (``own_scale``) instead of the scale its provable T-step accumulation bound leaves."""
    fixed = dequantized(snn, q, target, biases=False)
    free = own_scale(snn, q, target)
    return evolve(fixed, layers=fixed.layers[:-1] + free.layers[-1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", default="loihi2")
    p.add_argument("--timesteps", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--ftbc-target", default=Options.ftbc_target, choices=STEP_TARGETS)
    args = p.parse_args()
    opts = Options(model=Path(args.model), data=args.data, target=args.target,
                   timesteps=args.timesteps, eval_samples=args.eval_samples, verify_samples=0,
                   ftbc_target=args.ftbc_target, progress=False)
    start = time.perf_counter()
    run = pipeline.convert(pipeline.trace(pipeline.load(Run(options=opts))))
    snn, _ = calibrate(run.snn["converted"], run.ann, run.calib, method="ftbc",
                       **pipeline._calibration_settings(opts))
    run = replace(run, snn={**run.snn, "ftbc": snn})
    run = pipeline.quantize(pipeline.normalize(run))
    target = get_target(args.target)
    x, y = pipeline._eval_split(run)
    norm = run.normalized

    def acc(preds) -> float:
        return 100.0 * float((np.asarray(preds)[-1] == y).mean())

    row = {"float": acc(simulate(norm, x).predictions),
           "w": acc(simulate(dequantized(norm, run.quant, target, biases=False), x).predictions),
           "w+b": acc(simulate(dequantized(norm, run.quant, target, biases=True), x).predictions),
           "emulator": acc(emulate(run.quant, x).predictions),
           "w, own scale": acc(simulate(own_scale(norm, run.quant, target), x).predictions),
           "w, readout at 8 bits": acc(simulate(readout_at_8_bits(norm, run.quant, target),
                                                x).predictions)}
    print(f"| model | T | {' | '.join(row)} | s |")
    print(f"|---|---|{'---|' * len(row)}---|")
    print(f"| {Path(args.model).name} | {args.timesteps} | "
          f"{' | '.join(f'{v:.2f}' for v in row.values())} | "
          f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
