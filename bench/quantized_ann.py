"""How much of the SNN's drop is the T-step quantization itself? (issue 16 item 5)

The converted network's thresholds (``--threshold``, per T) define, per ReLU, the rate
quantiser an IF neuron with v[0] = theta/2 realises after T steps on a *constant* input::

    q_T(a) = clip(floor(a T / theta + 1/2), 0, T) * theta / T

This script runs the ANN with every ReLU replaced by q_T (per channel, the converted SNN's own
thresholds) and, separately, by the clip alone (min(relu(a), theta)). The quantised ANN has no
temporal error (every neuron sees its final average input from t = 1) and no unevenness error;
what it loses against the ANN is per-neuron rounding and clipping, which a per-channel bias
(LP, FTBC) cannot undo in general. So it shows how far a per-channel calibration can be
expected to bring the SNN on this model. Scored on the validation images of
``bench_validation.py`` (training images outside the calibration draw) and on the test subset
of ``--eval-samples`` (a diagnosis: nothing is selected here).

    OMP_NUM_THREADS=1 .venv/bin/python bench/quantized_ann.py \\
        --model bench/models/cifar_resnet20.pt --data cifar10:../shared/data/cifar10 \\
        --timesteps 1 2 4 8 16 [--scales 1 1.15 1.3]

``--scales``: every searched threshold times s (``--threshold-scale``), one row per T and s.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_validation import validation_split  # noqa: E402
from train_cifar import ResNet20  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402


class Quantiser(nn.Module):
    """Per-channel q_T (``steps``) or the clip alone (``steps`` None)."""

    def __init__(self, theta: np.ndarray, steps: int | None) -> None:
        super().__init__()
        self.theta = torch.tensor(theta, dtype=torch.float32).view(1, -1, 1, 1)
        self.steps = steps

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        theta = self.theta.view(1, -1, *([1] * (a.dim() - 2)))
        if self.steps is None:
            return torch.minimum(a.clamp(min=0), theta)
        k = torch.clamp(torch.floor(a * self.steps / theta + 0.5), 0, self.steps)
        return k * theta / self.steps


def with_quantisers(model: nn.Module, thetas: dict, steps: int | None) -> nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, (nn.ReLU, Quantiser)):
                setattr(module, child_name, Quantiser(thetas[full], steps))
    return model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 500])).argmax(1)
                          for i in range(0, len(x), 500)]).numpy()
    return 100.0 * float((pred == y).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a ResNet-20 of bench/train_cifar.py (.pt)")
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--threshold", default="mse")
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0],
                   help="threshold scales s (ftbc-export's --threshold-scale), one row each")
    args = p.parse_args()
    torch.set_num_threads(1)
    opts = Options(model=Path(args.model), data=args.data, verify_samples=0, progress=False,
                   threshold=args.threshold, eval_samples=args.eval_samples)
    run = pipeline.load(Run(options=opts))
    from toolchain.trace import trace as trace_model
    run = replace(run, ann=trace_model(run.loaded, tuple(run.data.x_train.shape[1:])))
    state = torch.jit.load(args.model).state_dict()
    x_val, y_val = validation_split(opts, run.data, args.val)
    x_test, y_test = pipeline._test_subset(run, args.eval_samples)
    base = ResNet20()
    base.load_state_dict(state)
    print(f"ANN: validation {accuracy(base, x_val, y_val):.2f}, "
          f"test subset {accuracy(base, x_test, y_test):.2f}")
    print("| T | s | clip only (val) | q_T (val) | clip only (test) | q_T (test) |")
    print("|---|---|---|---|---|---|")
    for steps in args.timesteps:
        for scale in args.scales:
            snn = pipeline.convert(replace(run, options=replace(
                opts, timesteps=steps, threshold_scale=(scale,)))).snn
            thetas = {l.name: np.broadcast_to(np.asarray(l.threshold), (l.channels,))
                      for l in snn["converted"].layers if not l.readout}
            clip = with_quantisers(ResNet20(), thetas, None)
            clip.load_state_dict(state)
            quant = with_quantisers(ResNet20(), thetas, steps)
            quant.load_state_dict(state)
            print(f"| {steps} | {scale:g} | {accuracy(clip, x_val, y_val):.2f} | "
                  f"{accuracy(quant, x_val, y_val):.2f} | {accuracy(clip, x_test, y_test):.2f} "
                  f"| {accuracy(quant, x_test, y_test):.2f} |", flush=True)


if __name__ == "__main__":
    main()
