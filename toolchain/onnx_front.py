"""ONNX front end: an ``onnx.ModelProto`` into the same ``AnnGraph`` as the PyTorch path.

The graph's nodes are visited in order (ONNX requires topological order). Each becomes an
``OnnxOp`` for the shared ``builder.Builder``: inputs resolved (the model input as an ``Act``;
initializers, ``Constant`` nodes and whatever is computed from them alone as torch tensors),
attributes in ``attrs``, and the example output computed by onnx's reference evaluator, one
node at a time, so every value has an example (shapes are known, shape arithmetic folds to
constants, and nodes after an unsupported one are still checked).

The ``onnx::<OpType>`` handlers below restate a node as the equivalent aten op and call that
op's handler in ``toolchain.builder``: BatchNorm folding, the input transform ``(x - mean) /
std``, clip merging, node naming and the all-at-once ``UnsupportedModelError`` are the same
code as for PyTorch models. Supported: Conv, Gemm, MatMul (+ Add), BatchNormalization, Relu,
Clip, AveragePool, GlobalAveragePool, ReduceMean over (H, W), Flatten, Reshape, Squeeze,
Add, Sub, Mul, Div, Identity, Dropout, Cast (to the same type), and the layout ops Slice
(positive steps), Pad (constant 0) and Concat; Shape, Size and Constant only make
constants. Any other node is reported with its name, op type, why and what to do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np
import onnx
import torch
from onnx.reference import ReferenceEvaluator

from core.errors import InputError
from core.ir import AnnGraph
from toolchain.builder import (EXAMPLE_BATCH, HANDLERS, Act, Builder, Op, Refuse, Scope, advice,
                               examples, handles, refuse, run_example, slice_act)

_FLT_MAX = float(np.finfo(np.float32).max)  # old opsets' Clip "no bound" default
_SUBGRAPH = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


@dataclass(frozen=True)
class OnnxOp(Op):
    """An ONNX node as a tracer op: ``kind`` is "onnx::<OpType>" (or the aten op it is
    restated as), ``node`` its name, ``attrs`` its attributes; messages name the node."""
    op_type: str = ""
    node: str = ""
    attrs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.op_type

    def describe(self) -> str:
        return f"node {self.node} ({self.op_type})"


# =========================================================================== handlers

def _as(b: Builder, op: OnnxOp, kind: str, *args: Any) -> Any:
    """Handle ``op`` as the aten op ``kind`` with schema-ordered ``args``."""
    return HANDLERS[kind](b, replace(op, kind=kind, args=args))


def _arg(op: Op, i: int) -> Any:
    """Input ``i``; None when it is omitted."""
    return op.args[i] if i < len(op.args) else None


def _act(op: Op) -> Act:
    if not isinstance(op.args[0], Act):
        raise refuse(op)
    return op.args[0]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple) else out


def _pads(op: OnnxOp, x: Act, kernel: list, strides: list, dilations: list) -> list[int]:
    """Per-axis padding from ``pads`` or ``auto_pad``; padding begin != end is refused."""
    n = len(kernel)
    mode = op.attrs.get("auto_pad", "NOTSET")
    if mode == "VALID":
        return [0] * n
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((math.ceil(s / st) - 1) * st + (k - 1) * d + 1 - s, 0) for s, k, st, d
                 in zip(x.example.shape[2:], kernel, strides, dilations)]
        pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    else:
        pads = [int(p) for p in op.attrs.get("pads", [0] * 2 * n)]
    if pads[:n] != pads[n:]:
        raise Refuse(f"pads asymmetrically (begin {pads[:n]}, end {pads[n:]})",
                     "use symmetric padding (an odd kernel for 'same' padding)")
    return pads[:n]


@handles("onnx::Conv")
def _conv(b: Builder, op: OnnxOp) -> Act:
    x, w = _act(op), _arg(op, 1)
    kernel = list(op.attrs.get("kernel_shape") or getattr(w, "shape", [0, 0, 1, 1])[2:])
    strides = list(op.attrs.get("strides", [1] * len(kernel)))
    dilations = list(op.attrs.get("dilations", [1] * len(kernel)))
    return _as(b, op, "aten::conv2d", x, w, _arg(op, 2), strides,
               _pads(op, x, kernel, strides, dilations), dilations, op.attrs.get("group", 1))


@handles("onnx::Gemm")
def _gemm(b: Builder, op: OnnxOp) -> Act:
    """alpha * x @ B' + beta * C with a constant B (transB either way): a Linear layer."""
    x, w, c = _act(op), _arg(op, 1), _arg(op, 2)
    if op.attrs.get("transA", 0):
        raise Refuse("transposes its activation input (transA=1)",
                     "export the Linear layer without transA")
    if isinstance(w, Act):
        raise Refuse(*advice("matmul"))
    mat2 = w.T if op.attrs.get("transB", 0) else w
    return _as(b, op, "aten::addmm", torch.zeros(()) if c is None else c, x, mat2,
               op.attrs.get("beta", 1.0), op.attrs.get("alpha", 1.0))


@handles("onnx::MatMul")
def _matmul(b: Builder, op: OnnxOp) -> Act:
    """x @ W with a constant W (I, O); a following Add of a constant becomes its bias."""
    if not isinstance(op.args[0], Act) and isinstance(op.args[1], Act):
        raise Refuse("multiplies a constant by an activation from the left (W @ x)",
                     "write the layer as x @ W (a Linear layer)")
    return _as(b, op, "aten::matmul", op.args[0], op.args[1])


@handles("onnx::BatchNormalization")
def _batch_norm(b: Builder, op: OnnxOp) -> Any:
    """Inference BatchNorm (one output, training_mode 0), folded by the aten handler."""
    training = bool(op.attrs.get("training_mode", 0)) or isinstance(op.out, tuple)
    return _as(b, op, "aten::batch_norm", *op.args[:5], training,
               op.attrs.get("momentum", 0.9), op.attrs.get("epsilon", 1e-5), False)


@handles("onnx::Relu")
def _relu(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::relu", _act(op))


def _bound(value: Any) -> Any:
    """A Clip bound as a float; None for absent and for +-inf / +-FLT_MAX ("no bound")."""
    if value is None or isinstance(value, Act):
        return value
    value = float(torch.as_tensor(value).item())
    return None if math.isinf(value) or abs(value) >= _FLT_MAX else value


@handles("onnx::Clip")
def _clip(b: Builder, op: OnnxOp) -> Act:
    """Clip(0, a) -> clipped ReLU; bounds from attributes (opset < 11) or constant inputs."""
    lo = op.attrs["min"] if "min" in op.attrs else _arg(op, 1)
    hi = op.attrs["max"] if "max" in op.attrs else _arg(op, 2)
    return _as(b, op, "aten::clamp", _act(op), _bound(lo), _bound(hi))


@handles("onnx::AveragePool")
def _avg_pool(b: Builder, op: OnnxOp) -> Act:
    """AveragePool (ONNX defaults: strides 1, count_include_pad 0)."""
    x, kernel = _act(op), list(op.attrs["kernel_shape"])
    strides = list(op.attrs.get("strides", [1] * len(kernel)))
    if any(d != 1 for d in op.attrs.get("dilations", [])):
        raise Refuse("uses dilated pooling windows", "use AvgPool2d without dilation")
    return _as(b, op, "aten::avg_pool2d", x, kernel, strides,
               _pads(op, x, kernel, strides, [1] * len(kernel)), op.attrs.get("ceil_mode", 0),
               op.attrs.get("count_include_pad", 0), None)


@handles("onnx::GlobalAveragePool")
def _global_pool(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::mean", _act(op), [2, 3], True)


@handles("onnx::ReduceMean")
def _reduce_mean(b: Builder, op: OnnxOp) -> Act:
    """Mean over (H, W): axes from the attribute (opset < 18) or a constant input."""
    axes = op.attrs.get("axes")
    if axes is None and _arg(op, 1) is not None:
        if isinstance(op.args[1], Act):
            raise Refuse("takes its axes from activations", "use constant axes")
        axes = [int(a) for a in torch.as_tensor(op.args[1]).reshape(-1)]
    return _as(b, op, "aten::mean", _act(op), list(axes) if axes else None,
               bool(op.attrs.get("keepdims", 1)))


@handles("onnx::Flatten", "onnx::Reshape", "onnx::Squeeze")
def _reshape(b: Builder, op: OnnxOp) -> Act:
    """Only a flatten to (N, -1) (or a reshape keeping the shape): checked on the shapes."""
    return _as(b, op, "aten::reshape", _act(op), list(op.out.shape))


@handles("onnx::Identity", "onnx::Cast")
def _identity(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::identity", _act(op))


@handles("onnx::Dropout")
def _dropout(b: Builder, op: OnnxOp) -> Act:
    """Inference Dropout (training_mode input absent or false); a mask output stays constant."""
    training = _arg(op, 2)
    if isinstance(training, Act):
        raise Refuse("has a training_mode computed from activations", "export in eval mode")
    op = replace(op, out=_first(op.out))
    return _as(b, op, "aten::dropout", _act(op), _arg(op, 1), bool(training))


@handles("onnx::Shape", "onnx::Size")
def _shape(b: Builder, op: OnnxOp) -> Any:
    """Shape queries give constants (the example's shape), as in the PyTorch front ends."""
    return op.out


@handles("onnx::Add")
def _add(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::add", op.args[0], op.args[1], 1.0)


@handles("onnx::Sub")
def _sub(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::sub", op.args[0], op.args[1], 1.0)


@handles("onnx::Mul")
def _mul(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::mul", op.args[0], op.args[1])


@handles("onnx::Div")
def _div(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::div", op.args[0], op.args[1], None)


# --------------------------------------------------------------------------- layout ops

def _ints(value: Any, what: str) -> list[int] | None:
    """A constant integer list (an attribute or an input); None when absent."""
    if value is None:
        return None
    if isinstance(value, Act):
        raise Refuse(f"takes its {what} from activations", f"use constant {what}")
    return [int(v) for v in torch.as_tensor(value).reshape(-1).tolist()]


@handles("onnx::Slice")
def _slice(b: Builder, op: OnnxOp) -> Act:
    """Slice (starts/ends/axes/steps as inputs, or attributes before opset 10): one aten
    slice per axis, each with its own example value."""
    source = op.attrs if "starts" in op.attrs else dict(zip(
        ("starts", "ends", "axes", "steps"), [_arg(op, i) for i in range(1, 5)]))
    starts, ends = _ints(source["starts"], "starts"), _ints(source["ends"], "ends")
    axes = _ints(source.get("axes"), "axes") or list(range(len(starts)))
    steps = _ints(source.get("steps"), "steps") or [1] * len(starts)
    x = _act(op)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        if step < 1:
            raise Refuse(f"steps by {step} (reverses the axis)", "slice with a positive step")
        index = [slice(None)] * x.example.dim()
        index[axis] = slice(start, end, step)
        x = slice_act(b, replace(op, out=x.example[tuple(index)]), x, axis, start, end, step)
    return x


@handles("onnx::Pad")
def _pad(b: Builder, op: OnnxOp) -> Act:
    """Pad (pads [begin..., end...] over all axes or ``axes``; attributes before opset 11),
    as F.pad's flat list; the aten handler refuses modes other than constant 0."""
    x = _act(op)
    ndim = x.example.dim()
    if "pads" in op.attrs:
        pads, value, axes = list(op.attrs["pads"]), op.attrs.get("value", 0.0), None
    else:
        pads, value, axes = _ints(_arg(op, 1), "pads"), _arg(op, 2), _arg(op, 3)
    if isinstance(value, Act):
        raise Refuse("takes its pad value from activations", "pad with the constant 0")
    axes = [a % ndim for a in (_ints(axes, "axes") or range(ndim))]
    begin = dict(zip(axes, pads[:len(axes)]))
    end = dict(zip(axes, pads[len(axes):]))
    flat = [v for a in reversed(range(ndim)) for v in (begin.get(a, 0), end.get(a, 0))]
    return _as(b, op, "aten::pad", x, flat, op.attrs.get("mode", "constant"), value)


@handles("onnx::Concat")
def _concat(b: Builder, op: OnnxOp) -> Act:
    return _as(b, op, "aten::cat", list(op.args), op.attrs["axis"])


# =========================================================================== graph walk

def _module_path(name: str) -> str:
    """The IR name of a node, as the PyTorch path names it: exporters name nodes
    "scope/.../OpType", and torch.onnx's scopes hold each module's name either qualified
    ("/features/features.0/Conv") or relative to its parent ("/layer1/layer1.0/conv1/Conv"
    is layer1.0.conv1). A name without scopes is kept."""
    *scopes, last = [p for p in name.split("/") if p] or [""]
    if not scopes:
        return last
    path = scopes[0]
    for scope in scopes[1:]:
        path = scope if scope.startswith(f"{path}.") else f"{path}.{scope}"
    return path


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))


def _value(env: dict, name: str, node: onnx.NodeProto | None) -> Any:
    if name not in env:
        user = f"node {node.name} ({node.op_type})" if node is not None else "the graph output"
        raise InputError(f"ONNX {user} reads {name!r}, which no earlier node or initializer "
                         "defines (the graph is not in topological order)")
    return env[name]


def _bind(env: dict, node: onnx.NodeProto, value: Any, outs: list) -> None:
    """Bind a handled value to the node's outputs; extra outputs (a Dropout mask) stay
    constants, their example values."""
    many = len(node.output) > 1 and isinstance(value, (tuple, list))
    values = list(value) if many else [value]
    for name, v in zip(node.output, values + outs[len(values):]):
        if name:
            env[name] = v


def _one_node_model(node: onnx.NodeProto, opsets: dict) -> onnx.ModelProto:
    """``node`` alone in a model with the file's opsets (the reference evaluator runs a bare
    NodeProto at the newest opset, where e.g. Clip has no min/max attributes)."""
    value = onnx.helper.make_empty_tensor_value_info
    graph = onnx.helper.make_graph([node], "node", [value(n) for n in node.input if n],
                                   [value(n) for n in node.output if n])
    return onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items()])


def _evaluator(b: Builder, op: OnnxOp, node: onnx.NodeProto,
               opsets: dict) -> ReferenceEvaluator | None:
    """The reference evaluator of one node; None (problem recorded) for nodes it cannot run
    on their own (control flow, unknown domains)."""
    if any(a.type in _SUBGRAPH for a in node.attribute):
        b.problem(op.describe(), f"{node.op_type} holds subgraphs (control flow)",
                  "export the model without data-dependent control flow")
        return None
    try:
        return ReferenceEvaluator(_one_node_model(node, opsets))
    except Exception:
        b.problem(op.describe(), f"{node.op_type} (domain {node.domain or 'ai.onnx'}) is not "
                  "an operator onnx can evaluate, and has no integrate-and-fire equivalent",
                  "export the model with standard ONNX operators (Conv, Gemm, Relu, Clip, "
                  "AveragePool, BatchNormalization, Flatten, Add)")
        return None


def _evaluate(evaluator: ReferenceEvaluator, node: onnx.NodeProto,
              args: tuple) -> list[torch.Tensor]:
    """The node's outputs on the example values of its inputs."""
    feeds = {name: v.detach().numpy() for name, v in zip(node.input, examples(args)) if name}
    outs = run_example(lambda: evaluator.run(None, feeds), f"node {node.name} ({node.op_type})")
    return [_tensor(o) for o in outs]


def _visit(b: Builder, node: onnx.NodeProto, index: int, env: dict, opsets: dict) -> None:
    args = tuple(_value(env, name, node) if name else None for name in node.input)
    op = OnnxOp(f"onnx::{node.op_type}", args, None, Scope(_module_path(node.name),
                node.op_type, node.name), node.op_type, node.name or f"#{index}", _attrs(node))
    poisoned = any(isinstance(a, Act) and a.example is None for a in args)
    evaluator = None if poisoned else _evaluator(b, op, node, opsets)
    if evaluator is None:  # downstream of (or at) a node recorded as a problem: no values
        env.update({name: Act(None, None) for name in node.output if name})
        return
    outs = _evaluate(evaluator, node, args)
    value = b.call(replace(op, out=outs[0] if len(outs) == 1 else tuple(outs)))
    _bind(env, node, value, outs)


# =========================================================================== input

def _user_input(graph: onnx.GraphProto, consts: dict) -> onnx.ValueInfoProto:
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise InputError(f"the ONNX graph takes {len(inputs)} inputs; ftbc needs exactly one "
                         "input tensor")
    return inputs[0]


def _example(info: onnx.ValueInfoProto, shape: tuple[int, ...]) -> torch.Tensor:
    """A random example batch of the declared dtype; the declared batch size when it is
    fixed (constant reshapes may depend on it), else ``EXAMPLE_BATCH``."""
    t = info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if t.HasField("shape") and (len(dims) != len(shape) + 1 or any(
            d is not None and d != s for d, s in zip(dims[1:], shape))):
        shown = ", ".join("?" if d is None else str(d) for d in dims)
        raise InputError(f"the ONNX model's input {info.name!r} is ({shown}), not (N, "
                         f"{', '.join(map(str, shape))}): pass the matching --input-shape")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
    if dtype.kind != "f":
        raise InputError(f"the ONNX model's input {info.name!r} is {dtype}; ftbc needs a "
                         "float input")
    batch = dims[0] if dims and dims[0] else EXAMPLE_BATCH
    return _tensor(np.random.default_rng(0).random((batch, *shape)).astype(dtype))


# =========================================================================== entry point

def trace_onnx(model: onnx.ModelProto, shape: tuple[int, ...], origin: str) -> AnnGraph:
    """The ONNX model as an ``AnnGraph`` (see the module docstring)."""
    graph = model.graph
    consts = {t.name: _tensor(onnx.numpy_helper.to_array(t)) for t in graph.initializer}
    x = _user_input(graph, consts)
    b = Builder(_example(x, shape), origin)
    env: dict[str, Any] = {**consts, x.name: b.input_act()}
    opsets = {("" if o.domain == "ai.onnx" else o.domain): o.version for o in model.opset_import}
    for index, node in enumerate(graph.node):
        _visit(b, node, index, env, opsets)
    return b.finish([_value(env, o.name, None) for o in graph.output])
