"""Train the demo model: a small CNN on sklearn's 8x8 digits, saved as TorchScript.

    .venv/bin/python examples/train_digits.py            # writes examples/digits_cnn.pt

Architecture (5 spiking layers + a Linear readout): input normalisation (x - mean) / std
held as buffers inside the model, conv(1->16)-BN-ReLU, conv(16->32)-BN-ReLU, AvgPool2,
conv(32->32)-BN-ReLU, AvgPool2, Flatten, Linear(128->64)-ReLU, Linear(64->10).
Seeded and deterministic; one CPU thread; about 10 s. The training helpers (``fit``,
``accuracy``, ``save_torchscript``) are reused by ``bench/train_mnist.py``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolchain.data import load_data  # noqa: E402


class DigitsCnn(nn.Module):
    """conv-bn-relu x3 with two average pools, then a 2-layer classifier."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([mean]).view(1, 1, 1, 1))
        self.register_buffer("std", torch.tensor([std]).view(1, 1, 1, 1))
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 64), nn.ReLU(),
                                        nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - self.mean) / self.std))


def seed_everything(seed: int, threads: int = 1) -> torch.Generator:
    """Seed torch, make kernels deterministic, limit threads; returns a data generator."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
        batch_size: int, gen: torch.Generator, log=print) -> nn.Module:
    """Adam with a cosine learning-rate schedule over ``epochs`` passes of shuffled batches."""
    xt, yt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y))
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order, total = torch.randperm(len(xt), generator=gen), 0.0
        for start in range(0, len(xt), batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(xt):.4f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = sum(int((model(torch.from_numpy(np.array(x[i:i + batch_size]))).argmax(1)
                       == torch.from_numpy(np.array(y[i:i + batch_size]))).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def save_torchscript(model: nn.Module, path: Path) -> None:
    """Script the eval-mode model and save it (the toolchain's preferred input format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model.eval()), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "digits_cnn.pt")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    gen = seed_everything(args.seed)
    data = load_data("digits")
    model = DigitsCnn(float(data.x_train.mean()), float(data.x_train.std()))
    fit(model, data.x_train, data.y_train, epochs=args.epochs, lr=1e-2, batch_size=64,
        gen=gen, log=lambda msg: None)
    acc = accuracy(model, data.x_test, data.y_test)
    save_torchscript(model, args.out)
    print(f"digits test accuracy {acc:.2f} % ({len(data.x_test)} images), "
          f"trained in {time.perf_counter() - start:.1f} s, saved {args.out}")


if __name__ == "__main__":
    main()
