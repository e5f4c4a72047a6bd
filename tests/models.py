"""Small torch models shared by the tests (import as ``tests.models``).

``LAYER_CASES`` maps a case name to (factory, input shape): one model per supported layer
kind, each ending in a Linear readout. ``WHOLE_MODELS`` are complete networks (incl. a
residual one); ``UnsupportedNet`` mixes several layers the converter must refuse.
Every factory is seeded and returns a model in eval mode, scriptable and traceable, with
BatchNorm statistics randomised so that folding is really exercised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from examples.qcfs import GradFloor


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=gen) * 0.3)
    return model.eval()


def head(body: nn.Module, input_shape: tuple[int, ...], classes: int = 3) -> nn.Sequential:
    """``body`` followed by Flatten and a Linear readout sized for ``input_shape``."""
    with torch.no_grad():
        features = body.eval()(torch.zeros(1, *input_shape)).flatten(1).shape[1]
    return nn.Sequential(body, nn.Flatten(), nn.Linear(features, classes))


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return randomize_bn(fn())
    return make


# --------------------------------------------------------------------------- functional forms

class FunctionalRelu(nn.Module):
    """conv -> F.relu -> view(N, -1) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


class Clamp(nn.Module):
    """conv -> torch.clamp(x, 0, 2) -> reshape -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(self.conv(x), 0.0, 2.0)
        return self.fc(x.reshape(x.shape[0], -1))


class ClampMinMax(nn.Module):
    """conv -> clamp_min(0) -> clamp_max(1.5) -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).clamp_min(0.0).clamp_max(1.5)
        return self.fc(torch.flatten(x, 1))


class MeanPool(nn.Module):
    """conv -> relu -> mean over H, W (global average pooling) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class Normalized(nn.Module):
    """(x - mean) / std with per-channel buffers, then conv-relu-linear."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.2, 0.7]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.5, 0.25]).view(1, 2, 1, 1))
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class NormalizedMulAdd(nn.Module):
    """x * scale + shift (the mul/add form of an input normalisation)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.0, 4.0]).view(2, 1, 1))
        self.register_buffer("shift", torch.tensor([-0.4, -2.8]).view(2, 1, 1))
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn + identity, relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResidualNet(nn.Module):
    """Normalised input, stem, two basic blocks, average pooling, linear readout."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5]))
        self.register_buffer("std", torch.tensor([0.3]))
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        x = self.pool(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


class SmallCnn(nn.Module):
    """The digits example's shape: 3 conv-bn-relu, 2 avg pools, 2 linear layers."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 1, 1, 1), 0.3))
        self.register_buffer("std", torch.full((1, 1, 1, 1), 0.4))
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4, 32), nn.ReLU(),
                                        nn.Dropout(0.2), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features((x - self.mean) / self.std))


class UnsupportedNet(nn.Module):
    """Four problems: MaxPool2d, BatchNorm after ReLU, Sigmoid, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(4)
        self.gate = nn.Sigmoid()
        self.norm = nn.LayerNorm(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.pool(self.act(self.conv(x))))
        return self.fc(self.norm(torch.flatten(self.gate(x), 1)))


class TinyNet(nn.Module):
    """Linear-ReLU-Linear on (4,) inputs; used by the loader tests (state_dict + --arch)."""

    def __init__(self, hidden: int = 5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def build_after_marker(path: str) -> nn.Module:
    """What a malicious pickle could run: leaves a marker file, then returns a model."""
    Path(path).write_text("code from the pickle ran\n")
    return TinyNet()


class MarkerPayload:
    """Pickles to a call of ``build_after_marker(path)`` (unpickling it creates the marker)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (build_after_marker, (self.path,))


# --------------------------------------------------------------------------- the cases

IMG = (2, 6, 6)
LAYER_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv": (_seeded(lambda: head(nn.Conv2d(2, 4, 3), IMG)), IMG),
    "conv_stride_pad": (_seeded(lambda: head(nn.Conv2d(2, 4, 3, stride=2, padding=1), IMG)), IMG),
    "conv_dilation": (_seeded(lambda: head(nn.Conv2d(2, 4, 3, dilation=2, padding=2), IMG)), IMG),
    "conv_groups_nobias": (_seeded(lambda: head(nn.Conv2d(2, 4, 3, groups=2, bias=False),
                                                IMG)), IMG),
    "conv_same": (_seeded(lambda: head(nn.Conv2d(2, 4, 3, padding="same"), IMG)), IMG),
    "conv_bn_relu": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), IMG)), IMG),
    "conv_nobias_bn": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4)), IMG)), IMG),
    "linear_bn1d_relu": (_seeded(lambda: nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))), (6,)),
    "relu6": (_seeded(lambda: head(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU6()), IMG)), IMG),
    "hardtanh": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Hardtanh(0.0, 0.5)), IMG)), IMG),
    "functional_relu_view": (_seeded(FunctionalRelu), IMG),
    "clamp_reshape": (_seeded(Clamp), IMG),
    "clamp_min_max": (_seeded(ClampMinMax), IMG),
    "avgpool": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)), IMG)), IMG),
    "avgpool_stride_pad": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1)),
        IMG)), IMG),
    "adaptive_avgpool": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((3, 2))), IMG)), IMG),
    "mean_pool": (_seeded(MeanPool), IMG),
    "dropout_identity": (_seeded(lambda: head(nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Dropout(0.5), nn.Identity()), IMG)), IMG),
    "normalized_sub_div": (_seeded(Normalized), IMG),
    "normalized_mul_add": (_seeded(NormalizedMulAdd), IMG),
}

WHOLE_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "small_cnn": (_seeded(SmallCnn), (1, 8, 8)),
    "residual": (_seeded(ResidualNet), (1, 8, 8)),
}


class MatmulAdd(nn.Module):
    """Linear written as ``x @ w.t() + b`` and as ``torch.addmm(b, x, w.t())``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 6) * 0.4)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(3, 8) * 0.4)
        self.b2 = nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x @ self.w1.t() + self.b1)
        return torch.addmm(self.b2, h, self.w2.t())


LAYER_CASES["matmul_add_addmm"] = (_seeded(MatmulAdd), (6,))


# --------------------------------------------------------------------------- QCFS

class QCFS(nn.Module):
    """QCFS's activation as its public code writes it (``MyFloor``, ``examples/qcfs.py``:
    learned threshold ``up``, ``t`` levels, x / up, floor(x t + 0.5) / t, clamp(0, 1), * up),
    and the variants a user writes: ``channels`` > 0 (one threshold per channel, ``dims`` 4 or
    2), ``clamp_first`` (clamp(x / up, 0, 1) before the floor), ``up_as`` "param" / "buffer" /
    "tensor" (a tensor constant) / "float" (a Python number, per layer only)."""

    def __init__(self, up: float = 1.0, t: int = 4, channels: int = 0, dims: int = 4,
                 clamp_first: bool = False, up_as: str = "param") -> None:
        super().__init__()
        shape = (1, channels) + (1,) * (dims - 2) if channels else (1,)
        gen = torch.Generator().manual_seed(channels + 7 * t)
        value = up * (0.6 + 0.8 * torch.rand(shape, generator=gen)) if channels else \
            torch.tensor([up])
        if up_as == "param":
            self.up = nn.Parameter(value)
        elif up_as == "buffer":
            self.register_buffer("up", value)
        else:
            self.up = float(value.item()) if up_as == "float" else value
        self.t = t
        self.clamp_first = clamp_first

    def floor(self, x: torch.Tensor) -> torch.Tensor:
        return GradFloor.apply(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.up
        if self.clamp_first:
            x = torch.clamp(x, 0, 1)
            return self.floor(x * self.t + 0.5) / self.t * self.up
        x = self.floor(x * self.t + 0.5) / self.t
        x = torch.clamp(x, 0, 1)
        return x * self.up


class PlainQCFS(QCFS):
    """QCFS with a plain ``torch.floor``: what TorchScript and ONNX can save."""

    def floor(self, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(x)


class QcfsNet(nn.Module):
    """conv-BN-QCFS-AvgPool2, conv-BN-QCFS, Flatten, Linear-QCFS, Linear on (C, H, W) inputs
    (H, W even); ``act`` keyword arguments go to every QCFS (``per_channel``: one threshold
    per channel). Usable as ``--arch tests.models:QcfsNet`` with a state_dict."""

    def __init__(self, in_shape: tuple = (2, 6, 6), levels: int = 4, per_channel: bool = False,
                 plain: bool = False, classes: int = 3, **act) -> None:
        super().__init__()
        cls = PlainQCFS if plain else QCFS

        def qcfs(c: int, dims: int = 4) -> nn.Module:
            return cls(t=levels, channels=c if per_channel else 0, dims=dims, **act)
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 4, 3, padding=1), nn.BatchNorm2d(4), qcfs(4), nn.AvgPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), qcfs(6))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(6 * (h // 2) * (w // 2), 8),
                                        qcfs(8, 2), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def qcfs_net(**kwargs) -> nn.Module:
    """A seeded ``QcfsNet`` with randomised BatchNorm, in eval mode."""
    torch.manual_seed(0)
    return randomize_bn(QcfsNet(**kwargs))


def qcfs_residual_net(levels: int = 4) -> nn.Module:
    """``ResidualNet`` with every ReLU a QCFS (the blocks' second one acts on the residual
    sum, as in QCFS's ResNets)."""
    torch.manual_seed(0)
    model = ResidualNet()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, QCFS(up=1.5, t=levels))
    return randomize_bn(model)
