"""Train the MNIST benchmark models and save them as TorchScript.

    .venv/bin/python bench/train_mnist.py                 # MnistNet -> bench/models/mnist_cnn.pt
    .venv/bin/python bench/train_mnist.py --arch deep     # MnistDeep -> bench/models/mnist_deep.pt
    .venv/bin/python bench/train_mnist.py --act qcfs --levels 4  # -> models/mnist_cnn_qcfs_l4.pt2

``cnn`` (MnistNet, the model of /work/shared/bench/peer_mnist.md): input normalisation
(x - 0.1307) / 0.3081 inside the model, conv(1->16)-BN-ReLU-AvgPool2, conv(16->32)-BN-ReLU-
AvgPool2, Flatten, Linear(1568->128)-ReLU, Linear(128->10); 3 epochs of Adam.
``deep`` (MnistDeep, VGG-like, 6 spiking layers): conv8-conv16-pool-conv32-conv32-pool-conv32
(each conv-BN-ReLU), Flatten, Linear(1568->128)-ReLU, Linear(128->10); 2 epochs (about 3.5x
the compute of ``cnn`` per image; two epochs keep it within ~10 min on one thread).
``--act qcfs --levels L``: every ReLU replaced by the quantization-clip-floor-shift
activation of QCFS (Bu et al., ICLR 2022), written as its public code writes it
(``examples/qcfs.py``: learned threshold ``up``, initial value 4, L levels, floor with a
straight-through gradient), trained
the same way from scratch and saved with ``torch.export`` (TorchScript cannot script an
autograd.Function). The model is ``MnistNet`` / ``MnistDeep`` with that activation.
Seeded and deterministic; one CPU thread by default (the machine is shared).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from toolchain.data import load_data  # noqa: E402
from qcfs import QCFS, save_export, with_qcfs  # noqa: E402
from train_digits import accuracy, fit, save_torchscript, seed_everything  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class Normalized(nn.Module):
    """Base: (x - 0.1307) / 0.3081 as buffers, then ``features`` and ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([MNIST_MEAN]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([MNIST_STD]).view(1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - self.mean) / self.std))


class MnistNet(Normalized):
    """Two conv-BN-ReLU-AvgPool stages and a 1568-128-10 classifier (3 spiking layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_bn_relu(1, 16), nn.AvgPool2d(2),
                                      *conv_bn_relu(16, 32), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(1568, 128), nn.ReLU(),
                                        nn.Linear(128, 10))


class MnistDeep(Normalized):
    """VGG-like: five conv-BN-ReLU layers, two AvgPools, 1568-128-10 (6 spiking layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(1, 8), *conv_bn_relu(8, 16), nn.AvgPool2d(2),
            *conv_bn_relu(16, 32), *conv_bn_relu(32, 32), nn.AvgPool2d(2),
            *conv_bn_relu(32, 32))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(1568, 128), nn.ReLU(),
                                        nn.Linear(128, 10))


class MnistQcfs(MnistNet):
    """MnistNet with QCFS activations (for ``--arch bench.train_mnist:MnistQcfs`` with a
    state_dict; ``--arch-kwargs '{"levels": 4}'``)."""

    def __init__(self, levels: int = 8) -> None:
        super().__init__()
        with_qcfs(self, levels)


ARCHS = {"cnn": (MnistNet, 3, "mnist_cnn.pt"), "deep": (MnistDeep, 2, "mnist_deep.pt")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="cnn")
    parser.add_argument("--data", default="/work/shared/data/mnist")
    parser.add_argument("--act", choices=("relu", "qcfs"), default="relu",
                        help="qcfs: QCFS activations, saved with torch.export (.pt2)")
    parser.add_argument("--levels", type=int, default=8, help="QCFS quantization levels L")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cls, epochs, filename = ARCHS[args.arch]
    if args.act == "qcfs":
        filename = filename.replace(".pt", f"_qcfs_l{args.levels}.pt2")
    out = args.out or ROOT / "bench" / "models" / filename
    start = time.perf_counter()
    gen = seed_everything(args.seed, args.threads)
    data = load_data(f"mnist:{args.data}")
    model = cls() if args.act == "relu" else with_qcfs(cls(), args.levels)
    model = fit(model, data.x_train, data.y_train, epochs=args.epochs or epochs, lr=3e-3,
                batch_size=128, gen=gen)
    acc = accuracy(model, data.x_test, data.y_test)
    if args.act == "relu":
        save_torchscript(model, out)
    else:
        save_export(model, out, torch.from_numpy(data.x_test[:2].copy()))
    if args.act == "qcfs":
        ups = [round(m.up.item(), 3) for m in model.modules() if isinstance(m, QCFS)]
        print(f"{args.arch} qcfs L={args.levels}: learned thresholds {ups}")
    print(f"{args.arch} {args.act}: MNIST test accuracy {acc:.2f} % ({len(data.x_test)} images), "
          f"trained in {time.perf_counter() - start:.0f} s on {args.threads} thread(s), "
          f"saved {out}")


if __name__ == "__main__":
    main()
