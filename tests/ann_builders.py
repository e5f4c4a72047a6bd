"""Build AnnGraphs for tests directly from the IR node classes (no tracer needed).

``graph_from_sequential`` maps an ``nn.Sequential`` of Conv2d / BatchNorm2d (folded) / Linear /
ReLU / ReLU6 / AvgPool2d / Flatten to an AnnGraph; ``residual_graph`` hand-builds a graph
with an identity shortcut and a pool-only shortcut; ``train_digits_cnn`` trains a small CNN
on sklearn's bundled digits in a few seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from core.ir import (AddNode, AnnGraph, AvgPoolNode, ConvNode, FlattenNode, InputNode,
                     LinearNode, ReluNode, frozen_array)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv(name: str, src: str, m: nn.Conv2d) -> ConvNode:
    bias = m.bias.detach().numpy() if m.bias is not None else np.zeros(m.out_channels)
    return ConvNode(name, (src,), name, frozen_array(m.weight.detach().numpy()),
                    frozen_array(bias), _pair(m.stride), _pair(m.padding), _pair(m.dilation),
                    m.groups)


def _fold_bn(node: ConvNode, bn: nn.BatchNorm2d) -> ConvNode:
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    shift = (bn.bias - bn.running_mean * bn.weight
             / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    w = node.weight * scale[:, None, None, None]
    b = node.bias * scale + shift
    return ConvNode(node.name, node.inputs, node.origin, frozen_array(w), frozen_array(b),
                    node.stride, node.padding, node.dilation, node.groups)


def _node(name: str, src: str, m: nn.Module):
    if isinstance(m, nn.Conv2d):
        return _conv(name, src, m)
    if isinstance(m, nn.Linear):
        bias = m.bias.detach().numpy() if m.bias is not None else np.zeros(m.out_features)
        return LinearNode(name, (src,), name, frozen_array(m.weight.detach().numpy()),
                          frozen_array(bias))
    if isinstance(m, nn.ReLU6):
        return ReluNode(name, (src,), name, clip=6.0)
    if isinstance(m, nn.ReLU):
        return ReluNode(name, (src,), name)
    if isinstance(m, nn.AvgPool2d):
        return AvgPoolNode(name, (src,), name, _pair(m.kernel_size),
                           _pair(m.stride or m.kernel_size), _pair(m.padding))
    if isinstance(m, nn.Flatten):
        return FlattenNode(name, (src,), name)
    raise TypeError(f"unsupported module {type(m).__name__}")


def graph_from_sequential(seq: nn.Sequential, input_shape: tuple[int, ...],
                          mean=None, std=None) -> AnnGraph:
    """AnnGraph of ``seq`` (BatchNorm2d folded into the preceding conv); node names are the
    module indices prefixed by their kind, e.g. ``conv0``, ``relu1``."""
    nodes = [InputNode("x", (), "input", tuple(input_shape),
                       None if mean is None else frozen_array(mean),
                       None if std is None else frozen_array(std))]
    for idx, m in enumerate(seq):
        if isinstance(m, nn.BatchNorm2d):
            nodes[-1] = _fold_bn(nodes[-1], m)
            continue
        kind = type(m).__name__.lower().replace("2d", "")
        nodes.append(_node(f"{kind}{idx}", nodes[-1].name, m))
    return AnnGraph(tuple(nodes), nodes[-1].name)


def residual_graph(seed: int = 0, channels: int = 4, classes: int = 10) -> AnnGraph:
    """8x8 input; identity shortcut (r1 + conv) and a pool-only shortcut (pool(r3) + strided
    conv(r3)); then pool, flatten, linear."""
    g = np.random.default_rng(seed)
    c = channels

    def conv(name, src, cin, stride=1):
        w = g.normal(0, 0.5 / np.sqrt(cin * 9), (c, cin, 3, 3))
        return ConvNode(name, (src,), name, frozen_array(w),
                        frozen_array(g.normal(0, 0.05, c)), (stride, stride), (1, 1))
    nodes = [InputNode("x", (), "input", (1, 8, 8)),
             conv("c1", "x", 1), ReluNode("r1", ("c1",), "r1"),
             conv("c2", "r1", c), ReluNode("r2", ("c2",), "r2"),
             conv("c3", "r2", c), AddNode("add1", ("c3", "r1"), "add1"),
             ReluNode("r3", ("add1",), "r3"),
             AvgPoolNode("p1", ("r3",), "p1", (2, 2), (2, 2)),
             conv("c4", "r3", c, stride=2), AddNode("add2", ("c4", "p1"), "add2"),
             ReluNode("r4", ("add2",), "r4"),
             AvgPoolNode("p2", ("r4",), "p2", (2, 2), (2, 2)),
             FlattenNode("flat", ("p2",), "flat"),
             LinearNode("fc", ("flat",), "fc",
                        frozen_array(g.normal(0, 0.3, (classes, c * 4))),
                        frozen_array(g.normal(0, 0.05, classes)))]
    return AnnGraph(tuple(nodes), "fc")


@dataclass(frozen=True)
class Digits:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits_split(seed: int = 0) -> Digits:
    """sklearn's bundled 8x8 digits, float32 (N, 1, 8, 8) in [0, 1], a seeded 80/20 split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    tr, te = idx[:cut], idx[cut:]
    return Digits(x[tr], d.target[tr], x[te], d.target[te])


def small_cnn() -> nn.Sequential:
    """3 spiking layers: conv-relu-pool, conv-relu-pool, flatten, linear-relu, linear."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def deep_cnn() -> nn.Sequential:
    """6 spiking layers (4 conv + 2 dense) for calibration benchmarks."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def train(model: nn.Sequential, data: Digits, *, epochs: int = 40, seed: int = 0,
          lr: float = 1e-2) -> nn.Sequential:
    """Adam on the training split, seeded; returns the model in eval mode."""
    torch.manual_seed(seed)
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@lru_cache(maxsize=4)
def train_digits_cnn(builder=small_cnn, *, epochs: int = 25, seed: int = 0):
    """(AnnGraph, Digits): a small CNN trained on digits (a few seconds on one thread),
    cached per process so test modules share one training run (the graph is immutable)."""
    torch.manual_seed(seed)
    data = digits_split(seed)
    model = train(builder(), data, epochs=epochs, seed=seed)
    return graph_from_sequential(model, (1, 8, 8)), data
