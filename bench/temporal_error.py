"""Where the converted SNN's error lives, and what a neuron that can take a spike back buys.

On *validation* images (training images outside the calibration draw, as in
``bench_validation.py``; no test data), per T:

* accuracy at t = T of the product's plain conversion (``simulate``), and of the same network
  written over the trained torch modules (``--arch``, ``--ckpt``: ``train_cifar.py``'s class
  and checkpoint) with every ReLU replaced by a multi-step neuron that has the converted
  layer's per-channel thresholds, v_init = theta / 2 and reset by subtraction:
  ``if`` (the product's neuron: its agreement with the product is printed as the check of this
  what-if), ``signed`` (the same neuron also emits a -1 spike, and adds theta back, when its
  membrane is below 0 while its net count is positive: it can take back a spike that later
  inputs show was one too many, so after T steps its count is round(U / theta) clipped to
  0..T instead of the number of upward crossings), and ``q_T`` (the ANN with each ReLU replaced
  by the T-step quantiser clip(floor(a T / theta + 1/2), 0, T) theta / T: no temporal error at
  all). No calibration in this what-if (none of the three gets LP or FTBC biases);
* ``--decompose N``: per spiking layer, the product's rate error theta N / T - abar on N images
  for none / lp / ftbc, split into its channel mean (what a per-channel bias corrects), its
  per-position mean (what a per-neuron constant bias could correct) and the image-specific
  rest, as fractions of the mean squared error.

    OMP_NUM_THREADS=1 .venv/bin/python bench/temporal_error.py --arch resnet20 \\
        --ckpt bench/models/resnet20.ckpt --model bench/models/cifar_resnet20.pt \\
        --data cifar10:../shared/data/cifar10 --timesteps 2 4 8 16 --val 1000 [--decompose 300]

Findings: bench/README.md, "Accuracy on residual networks", part 6.
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
from train_cifar import ARCHS  # noqa: E402
from sims.torch_snn import run_network, simulate  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.ann import ann_forward  # noqa: E402
from toolchain.calibrate import calibrate  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402
from toolchain.trace import trace as trace_model  # noqa: E402

NEURONS = ("if", "signed", "q_T")


class MultiStep(nn.Module):
    """A ReLU's place in a (T * batch, ...) stack of per-step inputs: step t's currents are
    rows t * batch .. (t + 1) * batch (every other module of the model is linear, so it maps
    each step's spikes on its own, biases included, as the converted SNN does)."""

    def __init__(self, theta: torch.Tensor, steps: int, neuron: str) -> None:
        super().__init__()
        self.theta, self.steps, self.neuron = theta, steps, neuron
        self.up = self.down = 0  # spikes emitted: +1 and -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th = self.theta.reshape((1, -1) + (1,) * (x.dim() - 2))
        if self.neuron == "q_T":
            levels = torch.clamp(torch.floor(x * self.steps / th + 0.5), 0, self.steps)
            return levels * th / self.steps
        x = x.reshape((self.steps, -1) + x.shape[1:])
        v = (0.5 * th).expand_as(x[0]).clone()
        count = torch.zeros_like(v)
        out = []
        for t in range(self.steps):
            v = v + x[t]
            s = (v >= th).float()
            self.up += int(s.sum())
            if self.neuron == "signed":
                back = ((v < 0) & (count > 0)).float()
                self.down += int(back.sum())
                s = s - back
            v = v - s * th
            count = count + s
            out.append(s * th)
        return torch.stack(out).reshape((-1,) + x.shape[2:])


def what_if(arch: str, ckpt: Path, snn, x: np.ndarray, neuron: str) -> tuple[np.ndarray, int, int]:
    """Predictions at t = T of the trained model with every ReLU a ``neuron``, and the
    spikes its neurons emitted (+1 and -1)."""
    model = ARCHS[arch][0]()
    model.load_state_dict(torch.load(ckpt, map_location="cpu")["model"])
    model.eval()
    steps = 1 if neuron == "q_T" else snn.timesteps
    thetas = {l.name: torch.tensor(np.broadcast_to(l.threshold, (l.channels,)),
                                   dtype=torch.float32) for l in snn.layers if not l.readout}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                full = f"{parent_name}.{name}" if parent_name else name
                if full not in thetas:
                    raise SystemExit(f"ReLU {full} has no converted layer of that name")
                setattr(parent, name, MultiStep(thetas[full], snn.timesteps, neuron))
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), 250):
            xb = torch.from_numpy(x[i:i + 250]).float()
            z = model(xb.repeat(steps, 1, 1, 1)).reshape(steps, len(xb), -1)
            preds.append(z.sum(0).argmax(-1))
    neurons = [m for m in model.modules() if isinstance(m, MultiStep)]
    return (torch.cat(preds).numpy(), sum(m.up for m in neurons),
            sum(m.down for m in neurons))


def decompose(graphs: dict, ann, x: np.ndarray) -> None:
    _, values = ann_forward(ann, x, record=True, dtype=torch.float32)
    rows: dict[str, dict] = {}
    for method, g in graphs.items():
        spikes = run_network(g, x, keep_spikes=True).spikes
        for layer in g.layers:
            if layer.readout:
                continue
            view = (1, layer.channels) + (1,) * (len(layer.shape) - 1)
            theta = torch.tensor(np.broadcast_to(layer.threshold, (layer.channels,)),
                                 dtype=torch.float32).reshape(view)
            abar = torch.minimum(values[layer.name].clamp(min=0), theta)
            err = spikes[layer.name].float().sum(0) * theta / g.timesteps - abar
            mse = float((err ** 2).mean())
            pos = err.mean(0, keepdim=True)
            dims = tuple(range(2, err.dim()))
            chan = pos.mean(dims, keepdim=True) if dims else pos
            rows.setdefault(layer.name, {})[method] = (
                mse ** 0.5 / float(abar.mean()), float((chan ** 2).mean()) / mse,
                float(((pos - chan) ** 2).mean()) / mse, float(((err - pos) ** 2).mean()) / mse)
    print("| layer | rms error / mean abar (none / lp / ftbc) | channel-mean % | "
          "per-position % | image-specific % |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        cols = [" / ".join(f"{(100 if k else 1) * r[m][k]:.{3 if k == 0 else 1}f}"
                           for m in ("none", "lp", "ftbc")) for k in range(4)]
        print(f"| {name} | " + " | ".join(cols) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--ckpt", required=True, type=Path, help="train_cifar.py's checkpoint")
    p.add_argument("--model", required=True, type=Path,
                   help="the same weights as the saved model that ftbc-export converts")
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, nargs="+", default=[4])
    p.add_argument("--val", type=int, default=1000, help="validation (training) images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decompose", type=int, default=0, metavar="N",
                   help="also calibrate lp and ftbc and split each layer's error on N images")
    args = p.parse_args()
    torch.manual_seed(0)
    print("| T | ANN (val) | product none | what-if if (agreement with the product %) | "
          "signed | q_T | signed: spikes per if spike, of which -1 |")
    print("|---|---|---|---|---|---|---|")
    for steps in args.timesteps:
        opts = Options(model=args.model, data=args.data, timesteps=steps, verify_samples=0,
                       progress=False, seed=args.seed)
        run = pipeline.load(Run(options=opts))
        ann = trace_model(run.loaded, tuple(run.data.x_train.shape[1:]))
        run = pipeline.convert(replace(run, ann=ann))
        snn = run.snn["converted"]
        x, y = validation_split(opts, run.data, args.val)
        z = ann_forward(ann, x, dtype=torch.float32)
        ann_acc = 100.0 * float((z.argmax(-1).numpy() == y).mean())
        product = simulate(snn, x).predictions[-1]
        runs = {n: what_if(args.arch, args.ckpt, snn, x, n) for n in NEURONS}
        preds = {n: r[0] for n, r in runs.items()}
        acc = {n: 100.0 * float((p_ == y).mean()) for n, p_ in preds.items()}
        signed_spikes = runs["signed"][1] + runs["signed"][2]
        agree = 100.0 * float((preds["if"] == product).mean())
        print(f"| {steps} | {ann_acc:.2f} | {100.0 * float((product == y).mean()):.2f} | "
              f"{acc['if']:.2f} ({agree:.1f}) | {acc['signed']:.2f} | {acc['q_T']:.2f} | "
              f"{signed_spikes / max(runs['if'][1], 1):.3f}, "
              f"{runs['signed'][2] / max(signed_spikes, 1):.3f} |",
              flush=True)
        if args.decompose:
            graphs = {"none": snn}
            for method in ("lp", "ftbc"):
                graphs[method], _ = calibrate(snn, ann, run.calib, method=method,
                                              **pipeline._calibration_settings(opts))
            decompose(graphs, ann, x[:args.decompose])


if __name__ == "__main__":
    main()
