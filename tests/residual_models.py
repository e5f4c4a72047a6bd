"""Small residual and layout-op networks (seeded, BatchNorm randomised) for the layout tests.

Each entry of ``RESIDUAL_MODELS`` is ``name -> (make, input shape)``: the shortcut kinds of
the CIFAR ResNets (identity, option-A ``F.pad(x[:, :, ::2, ::2], ...)``, 1x1-conv), a
shortcut spanning three layers, and concatenations (an inception-style branch merge and a
DenseNet-style ``cat([x, f(x)])``). ``LAYOUT_ZOO`` exercises every layout op the tracer folds
(offset and end slices, narrow, asymmetric pads, crops, channel slices, spatial concat).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.train_cifar import ShortcutA  # the benchmark ResNet-20's own option-A shortcut
from tests.models import randomize_bn

SHAPE = (3, 8, 8)


def _seeded(make: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return randomize_bn(make()).eval()
    return build


def conv_bn(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                         nn.BatchNorm2d(cout))


class Block(nn.Module):
    """ResNet basic block; ``shortcut`` None is the identity."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv_bn(cin, cout, stride), conv_bn(cout, cout)
        self.shortcut = shortcut or nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.shortcut(x))


class Net(nn.Module):
    """stem (conv-bn-relu, 4 channels) -> ``body`` -> global average pool -> Linear(.., 3)."""

    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 4), nn.ReLU())
        self.body = body
        self.fc = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(self.stem(x)).mean((2, 3)))


class Span3(nn.Module):
    """x + f3(f2(f1(x))): the shortcut skips three layers."""

    def __init__(self) -> None:
        super().__init__()
        self.f1, self.f2, self.f3 = conv_bn(4, 4), conv_bn(4, 4), conv_bn(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f3(torch.relu(self.f2(torch.relu(self.f1(x)))))
        return torch.relu(y + x)


class Inception(nn.Module):
    """Two branches concatenated along channels, then a conv over both."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.merge = conv_bn(4, 3, k=1), conv_bn(4, 2), conv_bn(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], 1)
        return torch.relu(self.merge(y))


class Dense(nn.Module):
    """DenseNet-style growth: cat([x, relu(f(x))]) feeds the next conv and the head."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = conv_bn(4, 2), conv_bn(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([x, torch.relu(self.f(x))], 1)
        return torch.relu(self.g(y) + y)


RESIDUAL_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "identity": (_seeded(lambda: Net(Block(4, 4, 1, None), 4)), SHAPE),
    "option_a": (_seeded(lambda: Net(Block(4, 8, 2, ShortcutA(2)), 8)), SHAPE),
    "conv1x1": (_seeded(lambda: Net(Block(4, 8, 2, conv_bn(4, 8, 2, k=1)), 8)), SHAPE),
    "span3": (_seeded(lambda: Net(Span3(), 4)), SHAPE),
    "inception": (_seeded(lambda: Net(Inception(), 6)), SHAPE),
    "dense": (_seeded(lambda: Net(Dense(), 6)), SHAPE),
}


class LayoutZoo(nn.Module):
    """Every folded layout op on activations (and on the input) in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = conv_bn(3, 6), conv_bn(6, 4, k=1)
        self.c3 = nn.Conv2d(6, 4, 2)
        self.fc = nn.Linear(4 * 16 + 24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[:, :, 1::2], (0, 0, 1, 3))                      # offset slice, uneven pad
        a = torch.relu(self.c1(x))                                  # (6, 8, 8)
        b = a.narrow(1, 2, 3)[:, :, 1::2, 0:7:2]                    # (3, 4, 4)
        c = torch.relu(self.c2(a[:, :, ::2, ::2]))                  # (4, 4, 4)
        d = torch.cat([F.pad(b, (0, 0, 0, 0, 1, 0)), c[:, 1:3]], 1)  # (6, 4, 4)
        e = torch.relu(self.c3(F.pad(d, (1, 0, 0, 2))))             # (4, 5, 4)
        f = torch.cat([e, F.pad(c, (0, 0, 0, 0, 0, 0))], 2)        # (4, 9, 4), no-op pad
        flat = torch.cat([f[:, :, :4].flatten(1), a[:, :, 0:1, :4].flatten(1)], 1)
        return self.fc(flat)


LAYOUT_ZOO = _seeded(LayoutZoo)
