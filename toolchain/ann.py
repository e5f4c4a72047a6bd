"""Evaluate an ``AnnGraph`` as the ANN it came from (torch, batched).

One evaluator per node type, in a table keyed by the node's class. Used to check the tracer
(the IR must reproduce the original model's outputs) and to give FTBC its ANN activations.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.ir import (AddNode, AnnGraph, AnnNode, AvgPoolNode, ConcatNode, ConvNode,
                     FlattenNode, InputNode, LinearNode, PadNode, QcfsNode, ReluNode,
                     SliceNode)

Evaluator = Callable[[AnnNode, list[torch.Tensor]], torch.Tensor]
EVALUATORS: dict[type, Evaluator] = {}


def evaluates(node_type: type) -> Callable[[Evaluator], Evaluator]:
    def register(fn: Evaluator) -> Evaluator:
        EVALUATORS[node_type] = fn
        return fn
    return register


def _t(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(arr, dtype=like.dtype, device=like.device)  # copy: IR arrays are read-only


@evaluates(InputNode)
def _input(node: InputNode, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    if node.mean is None:
        return x
    chan = (1, -1) + (1,) * (x.dim() - 2)
    return (x - _t(node.mean, x).reshape(chan)) / _t(node.std, x).reshape(chan)


@evaluates(ConvNode)
def _conv(node: ConvNode, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    return F.conv2d(x, _t(node.weight, x), _t(node.bias, x), node.stride, node.padding,
                    node.dilation, node.groups)


@evaluates(LinearNode)
def _linear(node: LinearNode, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    return F.linear(x, _t(node.weight, x), _t(node.bias, x))


@evaluates(ReluNode)
def _relu(node: ReluNode, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].clamp(min=0.0, max=node.clip)


@evaluates(QcfsNode)
def _qcfs(node: QcfsNode, xs: list[torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    theta = _t(node.threshold, x).reshape((1, -1) + (1,) * (x.dim() - 2))
    steps = torch.floor(x * node.levels / theta + 0.5).clamp(0, node.levels)
    return steps * theta / node.levels


@evaluates(AvgPoolNode)
def _avgpool(node: AvgPoolNode, xs: list[torch.Tensor]) -> torch.Tensor:
    return F.avg_pool2d(xs[0], node.kernel, node.stride, node.padding)


@evaluates(FlattenNode)
def _flatten(node: FlattenNode, xs: list[torch.Tensor]) -> torch.Tensor:
    return xs[0].flatten(1)


@evaluates(AddNode)
def _add(node: AddNode, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(xs).sum(0)


@evaluates(SliceNode)
def _slice(node: SliceNode, xs: list[torch.Tensor]) -> torch.Tensor:
    index = (slice(None),) * node.dim + (slice(node.start, node.stop, node.step),)
    return xs[0][index]


def _torch_pads(pads: tuple[tuple[int, int], ...]) -> list[int]:
    """Per-axis (before, after) from axis 1 on -> F.pad's flat list (last axis first)."""
    return [int(v) for pair in reversed(pads) for v in pair]


@evaluates(PadNode)
def _pad(node: PadNode, xs: list[torch.Tensor]) -> torch.Tensor:
    return F.pad(xs[0], _torch_pads(node.pads))


@evaluates(ConcatNode)
def _concat(node: ConcatNode, xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, node.dim)


def _as_batch(x: torch.Tensor | np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.array(x, copy=True)).to(dtype)  # data arrays are read-only


@torch.no_grad()
def ann_forward(graph: AnnGraph, x: torch.Tensor | np.ndarray, *, record: bool = False,
                dtype: torch.dtype = torch.float32):
    """Run the graph on a batch. Returns the output, or ``(output, {node name: value})`` when
    ``record`` is set (every node's value, e.g. the ReLU activations FTBC targets)."""
    values: dict[str, torch.Tensor] = {}
    for node in graph.nodes:
        ins = ([_as_batch(x, dtype)] if isinstance(node, InputNode)
               else [values[name] for name in node.inputs])
        values[node.name] = EVALUATORS[type(node)](node, ins)
    out = values[graph.output]
    return (out, values) if record else out


def ann_predictions(graph: AnnGraph, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Top-1 class of every sample (N,) int64, batched."""
    preds = [ann_forward(graph, x[start:start + batch_size]).argmax(1).numpy()
             for start in range(0, len(x), batch_size)]
    return np.concatenate(preds).astype(np.int64) if preds else np.zeros(0, np.int64)


def ann_accuracy(graph: AnnGraph, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> float:
    """Top-1 accuracy in percent over (x, y), batched."""
    return float(100.0 * (ann_predictions(graph, x, batch_size) == y).mean()) if len(x) else 0.0
