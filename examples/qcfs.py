"""QCFS's activation (Bu et al., ICLR 2022) as its public code writes it, for training models
that convert to spiking networks with few time steps.

QCFS's code calls the module ``MyFloor(up, t)``: a learned threshold ``up`` (initial 8 there;
4 here, where BatchNorm'd activations are smaller) and ``t`` = L quantization levels::

    x = x / up;  x = floor(x * t + 0.5) / t  (straight-through gradient);  clamp(x, 0, 1) * up

``with_qcfs(model, L)`` puts one in place of every ``nn.ReLU``. ``save_export`` saves the
trained model with ``torch.export`` (TorchScript cannot script the autograd.Function): ftbc
reads the ``.pt2`` and converts every QCFS to IF neurons with threshold ``up`` and
v[0] = up / 2 (README, "Models trained for conversion"). Used by ``bench/train_mnist.py`` and
``bench/train_cifar.py`` (``--act qcfs --levels L``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

INIT_UP = 4.0


class GradFloor(torch.autograd.Function):
    """floor with a straight-through gradient (QCFS's ``GradFloor``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.floor()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class QCFS(nn.Module):
    """QCFS's activation (its code calls it ``MyFloor``): learned threshold ``up``, ``t`` = L
    quantization levels; theta * clip(floor(x L / theta + 1/2) / L, 0, 1)."""

    def __init__(self, up: float = INIT_UP, t: int = 8) -> None:
        super().__init__()
        self.up = nn.Parameter(torch.tensor([up]), requires_grad=True)
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.up
        x = GradFloor.apply(x * self.t + 0.5) / self.t
        x = torch.clamp(x, 0, 1)
        return x * self.up


def with_qcfs(model: nn.Module, levels: int) -> nn.Module:
    """``model`` with every nn.ReLU replaced by a QCFS activation of ``levels`` levels."""
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, QCFS(t=levels))
        else:
            with_qcfs(child, levels)
    return model


def save_export(model: nn.Module, path: Path, example: torch.Tensor) -> None:
    """torch.export the eval-mode model on an example batch and save it (.pt2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(model.eval(), (example,))
    torch.export.save(program, str(path))
