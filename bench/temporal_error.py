"""Where the converted SNN's error lives, and what a neuron that can take a spike back buys.

On *validation* images (training images outside the calibration draw, as in
``bench_validation.py``; test images only with ``--test``, to report), per T:

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
* ``--calibrate``: also the what-if ``if`` and ``signed`` networks with LP's and FTBC's
  per-channel biases, fitted as the paper's loop does (layer by layer in forward order,
  ``--iterations`` updates of b += alpha (target - mean output) per layer, each on all of the
  product's calibration images at once, FTBC one bias per step, LP one for all steps; the
  step targets of ``--ftbc-target``, as the product's; no held-out keep rule), beside the
  product's own LP and FTBC (pipeline defaults) as the control;
* ``--test N``: score on N test images (the product's fixed draw; 10000: all) instead of
  validation images: reported, never used to choose anything;
* ``--decompose N``: per spiking layer, the product's rate error theta N / T - abar on N images
  for none / lp / ftbc, split into its channel mean (what a per-channel bias corrects), its
  per-position mean (what a per-neuron constant bias could correct) and the image-specific
  rest, as fractions of the mean squared error.

    OMP_NUM_THREADS=1 .venv/bin/python bench/temporal_error.py --arch resnet20 \\
        --ckpt bench/models/resnet20.ckpt --model bench/models/cifar_resnet20.pt \\
        --data cifar10:../shared/data/cifar10 --timesteps 2 4 8 16 --val 1000 [--decompose 300]

``--ckpt`` may be left out: the state dict is then read from ``--model`` (``train_cifar.py``
saves the same module scripted, with the same parameter names).

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
from toolchain.ann import ann_accuracy, ann_forward  # noqa: E402
from toolchain.calibrate import calibrate, step_targets  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402
from toolchain.trace import trace as trace_model  # noqa: E402

NEURONS = ("if", "signed", "q_T")
V_INIT = 0.5  # fraction of theta, the product's default


class MultiStep(nn.Module):
    """A ReLU's place in a (T * batch, ...) stack of per-step inputs: step t's currents are
    rows t * batch .. (t + 1) * batch (every other module of the model is linear, so it maps
    each step's spikes on its own, biases included, as the converted SNN does).

    Calibration (``calibrate_what_if``) uses two more modes: ``"target"`` (the ReLU, adding
    up this layer's per-step targets from the ANN's activations) and ``"fit"`` (given every
    calibration image's input current at once, which depends only on the layers before, fit
    the bias by ``iterations`` updates, then emit the output with it: one forward pass
    calibrates the layers one after the other, as the paper's loop does)."""

    def __init__(self, theta: torch.Tensor, steps: int, neuron: str) -> None:
        super().__init__()
        self.theta, self.steps, self.neuron = theta, steps, neuron
        self.up = self.down = 0  # spikes emitted: +1 and -1
        self.bias: torch.Tensor | None = None  # (T, C): added to step t's input current
        self.mode = "run"  # or "target" / "fit" (calibration)
        self.ideal = True  # "target": the ideal step target, else the paper's flat one
        self.target = torch.zeros(())  # (T, C) target sums, then means
        self.seen = 0  # images behind self.target
        self.method, self.iterations, self.alpha = "ftbc", 3, 0.5  # "fit"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        th = self.theta.reshape((1, -1) + (1,) * (x.dim() - 2))
        if self.mode == "target":
            abar = torch.minimum(x.clamp(min=0), th)
            if self.ideal:
                target = step_targets(abar, th[0], torch.tensor(V_INIT), self.steps)
                target = target.reshape(self.steps, -1)
            else:
                target = per_channel(abar).expand(self.steps, -1)
            self.target = self.target + target.double() * len(x)
            self.seen += len(x)
            return x.clamp(min=0)
        if self.neuron == "q_T":
            levels = torch.clamp(torch.floor(x * self.steps / th + 0.5), 0, self.steps)
            return levels * th / self.steps
        x = x.reshape((self.steps, -1) + x.shape[1:])
        if self.mode == "fit":
            self.bias = torch.zeros(self.steps, x.shape[2])
            for _ in range(self.iterations):
                out = self._run(x, th, count_spikes=False)
                error = self.target - torch.stack([per_channel(o) for o in out])
                self.bias += self.alpha * (error if self.method == "ftbc"
                                           else error.mean(0, keepdim=True))
        return torch.stack(self._run(x, th)).reshape((-1,) + x.shape[2:])

    def _run(self, x: torch.Tensor, th: torch.Tensor,
             count_spikes: bool = True) -> list[torch.Tensor]:
        """Each step's output (spikes times theta) of the neurons fed x (T, batch, C, ...)."""
        v = (V_INIT * th).expand_as(x[0]).clone()
        count = torch.zeros_like(v)
        out = []
        for t in range(self.steps):
            v = v + x[t] if self.bias is None else v + x[t] + self.bias[t].reshape(th.shape[1:])
            s = (v >= th).float()
            if self.neuron == "signed":
                back = ((v < 0) & (count > 0)).float()
                s = s - back
            if count_spikes:
                self.up += int((s > 0).sum())
                self.down += int((s < 0).sum())
            v = v - s * th
            count = count + s
            out.append(s * th)
        return out


def per_channel(a: torch.Tensor) -> torch.Tensor:
    """Mean over batch and positions in a's dtype: (batch, C, ...) -> (C,). Not
    ``toolchain.calibrate.channel_mean``, which accumulates in float64: part 7's figures were
    measured with this float32 mean, and the calibration is sensitive enough that the float64
    one moves them by up to 1.7 points (validation T = 2)."""
    return a.transpose(0, 1).reshape(a.shape[1], -1).mean(1)


def build(arch: str, ckpt: Path | None, model_path: Path, snn, neuron: str) -> nn.Module:
    """The trained model with every ReLU replaced by a ``MultiStep`` ``neuron`` with the
    converted layer's thresholds; weights from ``ckpt`` or, without it, from the scripted
    ``model_path``."""
    model = ARCHS[arch][0]()
    state = (torch.load(ckpt, map_location="cpu")["model"] if ckpt is not None
             else torch.jit.load(str(model_path), map_location="cpu").state_dict())
    model.load_state_dict(state)
    model.eval()
    thetas = {l.name: torch.tensor(np.broadcast_to(l.threshold, (l.channels,)),
                                   dtype=torch.float32) for l in snn.layers if not l.readout}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                full = f"{parent_name}.{name}" if parent_name else name
                if full not in thetas:
                    raise SystemExit(f"ReLU {full} has no converted layer of that name")
                setattr(parent, name, MultiStep(thetas[full], snn.timesteps, neuron))
    return model


def neurons_of(model: nn.Module) -> list[MultiStep]:
    return [m for m in model.modules() if isinstance(m, MultiStep)]


def forward(model: nn.Module, x: np.ndarray, steps: int, batch: int = 250) -> np.ndarray:
    """Predictions at t = T (the readout summed over the steps)."""
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i:i + batch]).float()
            z = model(xb.repeat(steps, 1, 1, 1)).reshape(steps, len(xb), -1)
            preds.append(z.sum(0).argmax(-1))
    return torch.cat(preds).numpy()


def spikes(model: nn.Module) -> tuple[int, int]:
    layers = neurons_of(model)
    return sum(m.up for m in layers), sum(m.down for m in layers)


def calibrate_what_if(model: nn.Module, x: np.ndarray, method: str, ideal: bool,
                      iterations: int, alpha: float) -> None:
    """Fit LP's or FTBC's per-channel biases into ``model``'s neurons in place, layer by layer
    (``MultiStep``'s "fit" mode), on the calibration images ``x``."""
    layers = neurons_of(model)
    for m in layers:
        m.mode, m.ideal, m.target, m.seen = "target", ideal, torch.zeros(()), 0
    forward(model, x, 1)
    for m in layers:
        m.target = (m.target / m.seen).float()
        m.mode, m.method, m.iterations, m.alpha = "fit", method, iterations, alpha
    forward(model, x, layers[0].steps, batch=len(x))
    for m in layers:
        m.mode, m.up, m.down = "run", 0, 0


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


def what_if_row(args, snn, x: np.ndarray, y: np.ndarray, product: np.ndarray, ann_acc: float,
                steps: int) -> None:
    """One row of the uncalibrated what-if table."""
    acc, counts = {}, {}
    for neuron in NEURONS:
        model = build(args.arch, args.ckpt, args.model, snn, neuron)
        preds = forward(model, x, 1 if neuron == "q_T" else steps)
        acc[neuron], counts[neuron] = 100.0 * float((preds == y).mean()), spikes(model)
        if neuron == "if":
            agree = 100.0 * float((preds == product).mean())
    signed = sum(counts["signed"])
    print(f"| {steps} | {ann_acc:.2f} | {100.0 * float((product == y).mean()):.2f} | "
          f"{acc['if']:.2f} ({agree:.1f}) | {acc['signed']:.2f} | {acc['q_T']:.2f} | "
          f"{signed / max(counts['if'][0], 1):.3f}, {counts['signed'][1] / max(signed, 1):.3f} |",
          flush=True)


def calibrated_row(args, run, snn, ann, x: np.ndarray, y: np.ndarray, product: np.ndarray,
                   ann_acc: float, steps: int) -> None:
    """One row of the calibrated table: the product's none / lp / ftbc, the what-if ``if``
    and ``signed`` networks' none / lp / ftbc, q_T, and the spikes of signed ftbc."""
    def pct(preds: np.ndarray) -> str:
        return f"{100.0 * float((preds == y).mean()):.2f}"

    cells = [pct(product)]
    for method in ("lp", "ftbc"):
        graph, _ = calibrate(snn, ann, run.calib, method=method,
                             **pipeline._calibration_settings(run.options))
        cells.append(pct(simulate(graph, x).predictions[-1]))
    calib = np.asarray(run.calib, dtype=np.float32)
    ideal = run.options.ftbc_target == "ideal"
    counts = {}
    for neuron in ("if", "signed"):
        for method in ("none", "lp", "ftbc"):
            model = build(args.arch, args.ckpt, args.model, snn, neuron)
            if method != "none":
                calibrate_what_if(model, calib, method, ideal, args.iterations,
                                  run.options.alpha)
            cells.append(pct(forward(model, x, steps)))
            counts[neuron, method] = spikes(model)
    cells.append(pct(forward(build(args.arch, args.ckpt, args.model, snn, "q_T"), x, 1)))
    up, down = counts["signed", "ftbc"]
    print(f"| {steps} | {len(x)} | {ann_acc:.2f} | {' / '.join(cells[:3])} | "
          f"{' / '.join(cells[3:6])} | {' / '.join(cells[6:9])} | {cells[9]} | "
          f"{(up + down) / max(counts['if', 'none'][0], 1):.3f}, "
          f"{down / max(up + down, 1):.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--ckpt", type=Path,
                   help="train_cifar.py's checkpoint (default: the weights of --model)")
    p.add_argument("--model", required=True, type=Path,
                   help="the same weights as the saved model that ftbc-export converts")
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, nargs="+", default=[4])
    p.add_argument("--val", type=int, default=1000, help="validation (training) images")
    p.add_argument("--test", type=int, default=0, metavar="N",
                   help="score on N test images instead (the product's fixed draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decompose", type=int, default=0, metavar="N",
                   help="also calibrate lp and ftbc and split each layer's error on N images")
    p.add_argument("--calibrate", action="store_true",
                   help="LP and FTBC biases on the what-if networks too (second table)")
    p.add_argument("--ftbc-target", choices=("ideal", "paper"), default="ideal",
                   help="the step targets of the product's and the what-if's FTBC")
    p.add_argument("--iterations", type=int, default=3,
                   help="what-if calibration: updates per layer (the product's default)")
    args = p.parse_args()
    torch.manual_seed(0)
    images = "test" if args.test else "val"
    if args.calibrate:
        print(f"| T | {images} images | ANN | product none / lp / ftbc | if none / lp / ftbc | "
              "signed none / lp / ftbc | q_T | signed ftbc: spikes per if spike, of which -1 |")
        print("|---|---|---|---|---|---|---|---|")
    else:
        print(f"| T | ANN ({images}) | product none | what-if if (agreement with the product %) "
              "| signed | q_T | signed: spikes per if spike, of which -1 |")
        print("|---|---|---|---|---|---|---|")
    for steps in args.timesteps:
        opts = Options(model=args.model, data=args.data, timesteps=steps, verify_samples=0,
                       progress=False, seed=args.seed, ftbc_target=args.ftbc_target,
                       eval_samples=args.test or None)
        run = pipeline.load(Run(options=opts))
        ann = trace_model(run.loaded, tuple(run.data.x_train.shape[1:]))
        run = pipeline.convert(replace(run, ann=ann))
        snn = run.snn["converted"]
        x, y = (pipeline._eval_split(run) if args.test
                else validation_split(opts, run.data, args.val))
        ann_acc = ann_accuracy(ann, x, y)
        product = simulate(snn, x).predictions[-1]
        if args.calibrate:
            calibrated_row(args, run, snn, ann, x, y, product, ann_acc, steps)
        else:
            what_if_row(args, snn, x, y, product, ann_acc, steps)
        if args.decompose:
            graphs = {"none": snn}
            for method in ("lp", "ftbc"):
                graphs[method], _ = calibrate(snn, ann, run.calib, method=method,
                                              **pipeline._calibration_settings(opts))
            decompose(graphs, ann, x[:args.decompose])


if __name__ == "__main__":
    main()
