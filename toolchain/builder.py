"""The graph builder and its op handlers: what every front end (``toolchain.export_front``,
``toolchain.script_front``, ``toolchain.onnx_front``) calls to turn a model into an ``AnnGraph``.

Front ends walk a graph and call ``Builder.call(Op)`` for every operation, with the op's
arguments already resolved (activations as ``Act``, everything else as Python/torch
constants) and in aten schema order; ``toolchain.trace`` picks the front end for a loaded
model.

Each front end also runs every op on a small example batch (``run_example``), so every value
has an example tensor: shapes are known everywhere and ops on constants only (``x.size(0)``,
``w.t()``) fold to constants. Ops on activations dispatch through ``HANDLERS`` (canonical name
``aten::conv2d``; in-place variants map to their functional op), filled by ``@handles``.
Handlers emit IR nodes; rewrites (BatchNorm / constant scale folded into the Conv or Linear
before it, clamp_max merged into the ReLU before it) re-emit the producer, and nodes nobody
uses are pruned at the end, so a rewrite never changes a value someone else reads.

QCFS activations (floor and the elementwise ops around it) are matched by ``toolchain.qcfs``,
whose handlers wrap the affine and clamp handlers here (``toolchain.trace`` imports it).

Every op that cannot become integrate-and-fire neurons is recorded (module path, class, why,
what to do) and tracing goes on, so one ``UnsupportedModelError`` lists them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch

from core.errors import InputError, UnsupportedModelError
from core.ir import (AddNode, AnnGraph, AnnNode, AvgPoolNode, ConcatNode, ConvNode,
                     FlattenNode, InputNode, LinearNode, PadNode, ReluNode, SliceNode,
                     frozen_array)

EXAMPLE_BATCH = 2  # > 1 so that the batch axis is told apart from size-1 axes


# =========================================================================== values and ops

@dataclass(frozen=True, eq=False)
class Act:
    """An activation: the output of pending IR node ``key`` (None: downstream of an
    unsupported op), with an ``example`` value. ``affine`` = (scale, shift) per channel marks
    a value that is ``scale * input + shift`` (key is then the input node)."""
    key: int | None
    example: Any
    affine: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class Scope:
    """Where an op comes from: module path ("" for the top-level forward), its class and a
    source location."""
    path: str = ""
    cls: str = ""
    where: str = ""


@dataclass(frozen=True)
class Op:
    """One operation: canonical ``kind`` ("aten::conv2d"), schema-ordered ``args``, the
    example output ``out`` and its ``scope``."""
    kind: str
    args: tuple
    out: Any
    scope: Scope

    @property
    def label(self) -> str:
        return self.kind.split("::")[-1]

    def describe(self) -> str:
        if self.scope.path:
            return f"{self.scope.path} ({self.scope.cls or self.label})"
        at = f" at {self.scope.where}" if self.scope.where else ""
        return f"{self.kind}{at}"


class Refuse(Exception):
    """Raised by a handler: the op cannot become integrate-and-fire neurons."""

    def __init__(self, why: str, fix: str):
        super().__init__(why)
        self.why, self.fix = why, fix


class _Poisoned(Exception):
    """An input is downstream of an unsupported op (already reported)."""


@dataclass
class _Pending:
    """An IR node under construction; ``inputs`` are keys of other pending nodes."""
    cls: type
    inputs: tuple[int, ...]
    fields: dict
    scope: Scope
    label: str
    origin: str


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf of nested lists/tuples/dicts."""
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


def leaves(value: Any) -> list:
    out: list = []
    _map(value, out.append)
    return out


def has_act(value: Any) -> bool:
    return any(isinstance(v, Act) for v in leaves(value))


def examples(value: Any) -> Any:
    """``value`` with every Act replaced by its example tensor."""
    return _map(value, lambda v: v.example if isinstance(v, Act) else v)


def canonical(kind: str) -> str:
    """"aten::relu_" -> "aten::relu": in-place variants compute the same value."""
    if kind.endswith("_") and not kind.endswith("__"):
        return kind[:-1]
    return kind


# =========================================================================== advice

_ADVICE: dict[tuple[str, ...], tuple[str, str]] = {
    ("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices", "adaptive_max_pool2d",
     "amax", "max", "maxpool", "globalmaxpool", "reducemax", "lppool", "maxroipool"): (
        "takes a maximum, which integrate-and-fire neurons cannot compute (spike counts add, "
        "they are not compared)", "replace MaxPool2d by AvgPool2d and fine-tune"),
    ("sigmoid", "tanh", "gelu", "silu", "elu", "selu", "celu", "softplus", "mish", "hardswish",
     "hardsigmoid", "log_sigmoid", "softsign", "tanhshrink", "hardshrink", "softshrink",
     "erf", "thresholdedrelu"): (
        "is not ReLU-like: an integrate-and-fire neuron's rate is a clipped ramp "
        "min(max(x, 0), a)", "replace it with ReLU (or ReLU6) and retrain"),
    ("leaky_relu", "prelu", "rrelu", "_prelu_kernel", "leakyrelu"): (
        "passes negative values, but integrate-and-fire neurons cannot fire at negative rates",
        "replace it with ReLU and retrain"),
    ("softmax", "log_softmax", "_softmax", "_log_softmax", "logsoftmax"): (
        "normalises exponentials over all outputs, which no neuron layer computes",
        "remove it from the model (the prediction is the argmax of the logits)"),
    ("layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "instance_norm",
     "layernormalization", "groupnormalization", "instancenormalization",
     "lpnormalization", "meanvariancenormalization"): (
        "divides by statistics of the activations computed at run time, which cannot be "
        "folded into fixed weights", "use BatchNorm right after a Conv2d/Linear and retrain"),
    ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convtranspose"): (
        "is a transposed convolution (upsampling)", "use Conv2d (and AvgPool2d to downsample)"),
    ("stack",): (
        "stacks activations along a new axis, which no neuron layer's (C, H, W) shape holds",
        "concatenate along the channel axis with torch.cat(..., dim=1) instead"),
    ("mul", "matmul", "bmm", "mm", "baddbmm", "einsum", "scaled_dot_product_attention",
     "_scaled_dot_product_flash_attention_for_cpu"): (
        "multiplies two activations (attention, gating); synapses only multiply spikes by "
        "fixed weights", "remove the product of activations (e.g. attention) from the model"),
}
_DEFAULT_ADVICE = ("has no integrate-and-fire equivalent in ftbc",
                   "build the model from Conv2d, Linear, BatchNorm, ReLU/ReLU6/clamp(0, a), "
                   "AvgPool2d, Flatten and residual additions")


def advice(label: str) -> tuple[str, str]:
    """(why, fix) for an unsupported op label: an aten name ("max_pool2d") or an ONNX op type
    ("MaxPool", looked up in lower case)."""
    label = label.lower()
    return next((v for k, v in _ADVICE.items() if label in k), _DEFAULT_ADVICE)


def refuse(op: Op) -> Refuse:
    """The table's standard refusal for ``op``."""
    return Refuse(*advice(op.label))


# =========================================================================== builder

_UNSET = object()
Handler = Callable[["Builder", Op], Any]
HANDLERS: dict[str, Handler] = {}
SHAPE_QUERIES = {"aten::size", "aten::dim", "aten::numel", "aten::sym_size", "aten::sym_numel",
                 "prim::dtype", "prim::device", "prim::shape", "aten::is_floating_point"}


def handles(*kinds: str) -> Callable[[Handler], Handler]:
    """Register a handler for canonical op names (``"aten::conv2d"``)."""
    def register(fn: Handler) -> Handler:
        for kind in kinds:
            HANDLERS[kind] = fn
        return fn
    return register


class Builder:
    """Collects pending IR nodes and problems while a front end walks the model."""

    def __init__(self, example: torch.Tensor, origin: str):
        self.example = example
        self.nodes: list[_Pending] = [_Pending(InputNode, (), {}, Scope(), "input", origin)]
        self.input_affine: Any = _UNSET
        self.problems: list[str] = []
        self.chains: dict[int, Any] = {}  # elementwise chains being matched (toolchain.qcfs)

    def input_act(self) -> Act:
        chans = self.example.shape[1]
        return Act(0, self.example, (np.ones(chans), np.zeros(chans)))

    def problem(self, where: str, why: str, fix: str) -> None:
        self.problems.append(f"{where}: {why}; {fix}")

    # ------------------------------------------------------------ values
    def ref(self, act: Any) -> int:
        """The pending node holding ``act`` (fixing the input transform when it is one)."""
        if not isinstance(act, Act):
            raise Refuse("expects an activation here but got a constant",
                         "compute this from the input, or fold it into the weights")
        if act.key is None:
            raise _Poisoned()
        if act.affine is not None:
            self._use_input_affine(act.affine)
        return act.key

    def _use_input_affine(self, affine: tuple[np.ndarray, np.ndarray]) -> None:
        if np.any(affine[0] == 0):
            raise Refuse("multiplies the model input by 0", "remove the zero scale")
        if self.input_affine is _UNSET:
            self.input_affine = affine
        elif not all(np.array_equal(a, b) for a, b in zip(self.input_affine, affine)):
            raise Refuse("uses the model input with a second, different normalisation",
                         "normalise the input once at the start of forward()")

    def producer(self, act: Act) -> _Pending | None:
        return self.nodes[act.key] if isinstance(act, Act) and act.key is not None else None

    def emit(self, op: Op, cls: type, inputs: Iterable[Any], **fields: Any) -> Act:
        """Append a node computing ``op`` and return its activation."""
        keys = tuple(self.ref(a) for a in inputs)
        self.nodes.append(_Pending(cls, keys, fields, op.scope, op.label, op.describe()))
        return Act(len(self.nodes) - 1, op.out)

    def refold(self, op: Op, act: Act, **fields: Any) -> Act:
        """Re-emit ``act``'s producer with changed fields (the old one is pruned if unused)."""
        prod = self.producer(act)
        self.nodes.append(replace(prod, fields={**prod.fields, **fields},
                                  origin=f"{prod.origin} + {op.describe()}"))
        return Act(len(self.nodes) - 1, op.out)

    # ------------------------------------------------------------ ops
    def call(self, op: Op) -> Any:
        """Handle one op: constants fold, activations go through ``HANDLERS``."""
        if not has_act(op.args) or op.kind in SHAPE_QUERIES:
            return op.out
        if any(isinstance(a, Act) and a.key is None for a in leaves(op.args)):
            return _poison(op.out)
        try:
            handler = HANDLERS.get(op.kind)
            if handler is None:
                raise refuse(op)
            return handler(self, op)
        except Refuse as err:
            self.problem(op.describe(), f"{op.label} {err.why}", err.fix)
            return self._opaque(op)
        except _Poisoned:
            return _poison(op.out)

    def _opaque(self, op: Op) -> Any:
        """A stand-in node for a refused op, so that the ops after it are still checked."""
        keys = tuple(a.key for a in leaves(op.args) if isinstance(a, Act))
        self.nodes.append(_Pending(_Opaque, keys, {}, op.scope, op.label, op.describe()))
        key = len(self.nodes) - 1
        return _map(op.out, lambda v: Act(key, v) if isinstance(v, torch.Tensor) else v)

    # ------------------------------------------------------------ result
    def finish(self, output: Any) -> AnnGraph:
        """Prune unused nodes, name the rest, check the output; raise collected problems."""
        out = output[0] if isinstance(output, (tuple, list)) and len(output) == 1 else output
        if not isinstance(out, Act):
            self.problem("model output", "is not a single tensor computed from the input",
                         "return only the logits from forward()")
        elif getattr(out.example, "ndim", 2) != 2:
            self.problem("model output", f"has shape {tuple(out.example.shape)}, not (N, "
                         "classes)", "return the logits as one (N, classes) tensor")
        elif out.key is not None and self.nodes[out.key].cls is _Opaque:
            pass  # the op that computes it was refused and is reported already
        elif out.key is not None and self.nodes[out.key].cls is not LinearNode:
            self.problem(f"model output {self.nodes[out.key].origin}",
                         "is not produced by a Linear layer (the non-spiking readout)",
                         "end the model with a Linear layer (no activation after it)")
        if isinstance(out, Act) and out.key is not None:
            self.problems += [self.nodes[k].fields["problem"]
                              for k in _reachable(self.nodes, out.key)
                              if self.nodes[k].cls is Unresolved]
        if self.problems:
            raise UnsupportedModelError(self.problems)
        return self._graph(out.key)

    def _graph(self, out_key: int) -> AnnGraph:
        keep = _reachable(self.nodes, out_key)
        names = _names([self.nodes[k] for k in keep])
        name_of = dict(zip(keep, names))
        built = [self._ir(k, name_of) for k in keep]
        check_finite(built)
        return AnnGraph(tuple(built), name_of[out_key])

    def _ir(self, key: int, name_of: dict[int, str]) -> AnnNode:
        p = self.nodes[key]
        fields = {k: frozen_array(v) if isinstance(v, np.ndarray) else v
                  for k, v in p.fields.items()}
        if p.cls is InputNode:
            fields = self._input_fields()
        return p.cls(name=name_of[key], inputs=tuple(name_of[i] for i in p.inputs),
                     origin=p.origin, **fields)

    def _input_fields(self) -> dict:
        shape = tuple(self.example.shape[1:])
        if self.input_affine is _UNSET:
            return {"shape": shape}
        scale, shift = self.input_affine
        if np.all(scale == 1) and np.all(shift == 0):
            return {"shape": shape}
        return {"shape": shape, "mean": frozen_array(-shift / scale),
                "std": frozen_array(1.0 / scale)}


def check_finite(nodes: Iterable[AnnNode]) -> None:
    """One-line ``InputError`` naming every layer whose parameters (after BatchNorm and
    constant folding, so a negative running_var shows up too) hold NaN or Inf: such a model
    has no spiking equivalent, and every later stage would only propagate the NaNs."""
    bad = []
    for node in nodes:
        fields = [(k, v) for k, v in vars(node).items() if k in ("weight", "bias", "mean", "std")
                  and v is not None]
        counts = [f"{k} {int(np.size(v) - np.count_nonzero(np.isfinite(v)))}/{np.size(v)}"
                  for k, v in fields if not np.all(np.isfinite(np.asarray(v, np.float64)))]
        if counts:
            bad.append(f"{node.name} ({node.origin}): {', '.join(counts)} values")
    if bad:
        raise InputError(f"the model has NaN or Inf parameters (after folding BatchNorm) in "
                         f"{len(bad)} layer(s): {'; '.join(bad)}; fix the checkpoint (e.g. a "
                         f"diverged training run or a negative BatchNorm running_var)")


class _Opaque:
    """Pending-node class of a refused op (never reaches the IR: its problem is raised)."""


class Unresolved:
    """Pending-node class of a value that is only valid as part of a larger pattern (the floor
    of a QCFS activation, ``toolchain.qcfs``): never reaches the IR; if the output depends on
    it, its ``problem`` field is reported."""


def _poison(out: Any) -> Any:
    return _map(out, lambda v: Act(None, v) if isinstance(v, torch.Tensor) else v)


def _reachable(nodes: list[_Pending], out_key: int) -> list[int]:
    """Keys of the nodes the output depends on (plus the input), in order."""
    live, todo = {0, out_key}, [out_key]
    while todo:
        for k in nodes[todo.pop()].inputs:
            if k not in live:
                live.add(k)
                todo.append(k)
    return sorted(live)


def _names(nodes: list[_Pending]) -> list[str]:
    """Readable unique names: the module path, else the op label; repeats get _1, _2."""
    taken: set[str] = set()
    out = []
    for p in nodes:
        base = p.scope.path or p.label
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        out.append(name)
    return out


def run_example(fn: Callable[[], Any], what: str) -> Any:
    """Run an op on the example batch; a failure means the input shape does not fit."""
    try:
        with torch.no_grad():
            return fn()
    except (InputError, Refuse):
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"the model fails on its example input at {what}: {first} "
                         "(is the input shape right?)") from None


# =========================================================================== arg helpers

def act_arg(op: Op, i: int) -> Act:
    value = op.args[i]
    if not isinstance(value, Act):
        raise refuse(op)
    return value


def const_arg(op: Op, i: int) -> np.ndarray | None:
    """Argument ``i`` as a float64 array (None stays None); refuses activations."""
    value = op.args[i] if i < len(op.args) else None
    if isinstance(value, Act):
        raise refuse(op)
    if value is None:
        return None
    return torch.as_tensor(value).detach().to(torch.float64).numpy()


def scalar(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Act):
        raise Refuse("has a bound computed from activations", "use constant bounds")
    return float(torch.as_tensor(value).item()) if isinstance(value, torch.Tensor) else float(value)


def pair(value: Any) -> tuple[int, int]:
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def per_channel(value: Any, act: Act, what: str) -> np.ndarray:
    """A constant broadcast against ``act`` as one value per channel (axis 1)."""
    ex = act.example
    t = torch.as_tensor(value).detach().to(torch.float64)
    try:
        full = torch.broadcast_to(t, ex.shape).transpose(0, 1).reshape(ex.shape[1], -1)
    except RuntimeError:
        raise Refuse(f"{what} of shape {tuple(t.shape)} does not broadcast per channel over "
                     f"{tuple(ex.shape)}", "use one value per channel") from None
    if not torch.all(full == full[:, :1]):
        raise Refuse(f"{what} varies within a channel", "use one value per channel")
    return full[:, 0].numpy()


# =========================================================================== affine folding

def apply_affine(b: Builder, op: Op, act: Act, scale: Any, shift: Any, *,
                 allow_input: bool = True) -> Act:
    """Fold ``scale * act + shift`` (per channel) into the input transform or into the
    Conv/Linear that produced ``act``."""
    scale = np.broadcast_to(np.asarray(scale, np.float64), (act.example.shape[1],))
    shift = np.broadcast_to(np.asarray(shift, np.float64), scale.shape)
    if act.affine is not None and allow_input:
        a, s = act.affine
        return Act(act.key, op.out, (a * scale, s * scale + shift))
    prod = b.producer(act)
    if prod is None or prod.cls not in (ConvNode, LinearNode):
        raise Refuse("is not preceded by a Conv2d or Linear it could be folded into",
                     "place it directly after a Conv2d/Linear, or remove it")
    w = prod.fields["weight"]
    w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    return b.refold(op, act, weight=w, bias=prod.fields["bias"] * scale + shift)


# =========================================================================== handlers

@handles("aten::conv2d", "aten::_convolution_mode", "aten::convolution", "aten::_convolution")
def _conv(b: Builder, op: Op) -> Act:
    """Conv2d (any stride/padding/dilation/groups); transposed and non-2-D refused."""
    stride, padding, dilation, transposed, groups = (
        (3, 4, 5, None, 6) if op.kind in ("aten::conv2d", "aten::_convolution_mode")
        else (3, 4, 5, 6, 8))
    x, w = act_arg(op, 0), const_arg(op, 1)
    if transposed is not None and op.args[transposed]:
        raise Refuse(*advice("conv_transpose2d"))
    if w.ndim != 4:
        raise Refuse(f"is a {w.ndim - 2}-D convolution; only Conv2d is supported",
                     "use Conv2d on (N, C, H, W) inputs")
    bias = const_arg(op, 2)
    return b.emit(op, ConvNode, [x], weight=w, bias=np.zeros(len(w)) if bias is None else bias,
                  stride=pair(op.args[stride]), dilation=pair(op.args[dilation]),
                  padding=_conv_padding(op.args[padding], w.shape[2:], op.args[dilation]),
                  groups=int(op.args[groups]))


def _conv_padding(padding: Any, kernel: tuple, dilation: Any) -> tuple[int, int]:
    """Numeric padding; 'valid' is 0 and 'same' is (d (k - 1)) / 2 when that is whole."""
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        return pair(padding)
    total = [d * (k - 1) for d, k in zip(pair(dilation), kernel)]
    if any(t % 2 for t in total):
        raise Refuse("uses padding='same' with an even kernel (asymmetric padding)",
                     "use an odd kernel size or explicit symmetric padding")
    return (total[0] // 2, total[1] // 2)


def _dense(b: Builder, op: Op, x: Act, w: np.ndarray, bias: np.ndarray | None) -> Act:
    """Linear layer ``x @ w.T + bias`` on a 2-D activation."""
    if x.example.dim() != 2 or w is None or w.ndim != 2:
        raise Refuse(f"applies a Linear map to a {x.example.dim()}-D tensor",
                     "flatten to (N, features) before the Linear layer")
    return b.emit(op, LinearNode, [x], weight=w,
                  bias=np.zeros(len(w)) if bias is None
                  else np.broadcast_to(np.reshape(bias, -1), (len(w),)))


@handles("aten::linear")
def _linear(b: Builder, op: Op) -> Act:
    return _dense(b, op, act_arg(op, 0), const_arg(op, 1), const_arg(op, 2))


@handles("aten::mm", "aten::matmul")
def _matmul(b: Builder, op: Op) -> Act:
    w = const_arg(op, 1)
    return _dense(b, op, act_arg(op, 0), None if w is None else w.T, None)


@handles("aten::addmm")
def _addmm(b: Builder, op: Op) -> Act:
    """beta * bias + alpha * (x @ w_t)."""
    beta, alpha = scalar(op.args[3]), scalar(op.args[4])
    w_t, bias = const_arg(op, 2), const_arg(op, 0)
    return _dense(b, op, act_arg(op, 1), alpha * w_t.T, beta * bias)


@handles("aten::batch_norm", "aten::_native_batch_norm_legit_no_training")
def _batch_norm(b: Builder, op: Op) -> Any:
    """Eval-mode BatchNorm, folded exactly (float64) into the Conv/Linear before it."""
    x = act_arg(op, 0)
    if op.kind == "aten::batch_norm" and op.args[5]:
        raise Refuse("runs in training mode", "call model.eval() before saving")
    eps = float(op.args[7] if op.kind == "aten::batch_norm" else op.args[6])
    mean, var = const_arg(op, 3), const_arg(op, 4)
    gamma, beta = const_arg(op, 1), const_arg(op, 2)
    gamma = np.ones_like(mean) if gamma is None else gamma
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN/Inf: check_finite names it
        scale = gamma / np.sqrt(var + eps)
    shift = (np.zeros_like(mean) if beta is None else beta) - mean * scale
    out = apply_affine(b, op, x, scale, shift, allow_input=False)
    if isinstance(op.out, (tuple, list)):
        return (replace(out, example=op.out[0]),) + tuple(op.out[1:])
    return out


def _binary(op: Op) -> tuple[Any, Any, float]:
    alpha = scalar(op.args[2]) if len(op.args) > 2 and op.args[2] is not None else 1.0
    return op.args[0], op.args[1], alpha


@handles("aten::add")
def _add(b: Builder, op: Op) -> Act:
    """self + alpha * other: residual AddNode, or a constant folded as a shift."""
    x, y, alpha = _binary(op)
    if isinstance(x, Act) and isinstance(y, Act):
        if alpha != 1.0:
            raise Refuse("adds activations with a weight alpha != 1", "use a plain x + y")
        return b.emit(op, AddNode, [x, y])
    if isinstance(x, Act):
        return apply_affine(b, op, x, 1.0, alpha * per_channel(y, x, "added constant"))
    return apply_affine(b, op, y, alpha, per_channel(x, y, "added constant"))


@handles("aten::sub", "aten::rsub")
def _sub(b: Builder, op: Op) -> Act:
    """self - alpha * other (rsub: other - alpha * self), one side constant."""
    x, y, alpha = _binary(op)
    if op.kind == "aten::rsub":
        x, y = y, x
    if isinstance(x, Act) and isinstance(y, Act):
        raise Refuse("subtracts two activations", "use residual additions only")
    if isinstance(x, Act):
        return apply_affine(b, op, x, 1.0, -alpha * per_channel(y, x, "subtracted constant"))
    return apply_affine(b, op, y, -alpha, per_channel(x, y, "constant"))


@handles("aten::mul")
def _mul(b: Builder, op: Op) -> Act:
    x, y = op.args[0], op.args[1]
    if isinstance(x, Act) and isinstance(y, Act):
        raise refuse(op)
    act, const = (x, y) if isinstance(x, Act) else (y, x)
    return apply_affine(b, op, act, per_channel(const, act, "scale"), 0.0)


@handles("aten::div")
def _div(b: Builder, op: Op) -> Act:
    x, y = op.args[0], op.args[1]
    if not isinstance(x, Act) or isinstance(y, Act) or (len(op.args) > 2 and op.args[2]):
        raise Refuse("divides by an activation (or rounds)", "divide only by constants")
    divisor = per_channel(y, x, "divisor")
    if np.any(divisor == 0):
        raise Refuse("divides by zero", "fix the constant")
    return apply_affine(b, op, x, 1.0 / divisor, 0.0)


def _relu_like(b: Builder, op: Op, lo: float | None, hi: float | None) -> Act:
    """min(max(x, lo), hi) with lo in {0, None}: a ReLU, or a clip merged into the ReLU
    before it."""
    x = act_arg(op, 0)
    if lo not in (0.0, None) or (hi is not None and hi <= 0):
        raise Refuse(f"clips to [{lo}, {hi}], not [0, a] with a > 0 (integrate-and-fire rates "
                     "start at 0)", "use ReLU, ReLU6, Hardtanh(0, a) or clamp(0, a)")
    prod = b.producer(x)
    hi = None if hi is None or math.isinf(hi) else hi
    if prod is not None and prod.cls is ReluNode:
        old = prod.fields.get("clip")
        clip = old if hi is None else hi if old is None else min(old, hi)
        return b.refold(op, x, clip=clip)
    if lo is None:
        raise Refuse("clips from above without clipping at 0 first",
                     "use ReLU6, Hardtanh(0, a) or clamp(0, a)")
    return b.emit(op, ReluNode, [x], clip=hi)


@handles("aten::relu")
def _relu(b: Builder, op: Op) -> Act:
    return _relu_like(b, op, 0.0, None)


@handles("aten::relu6")
def _relu6(b: Builder, op: Op) -> Act:
    return _relu_like(b, op, 0.0, 6.0)


@handles("aten::hardtanh")
def _hardtanh(b: Builder, op: Op) -> Act:
    return _relu_like(b, op, scalar(op.args[1]), scalar(op.args[2]))


@handles("aten::clamp")
def _clamp(b: Builder, op: Op) -> Act:
    return _relu_like(b, op, scalar(op.args[1]), scalar(op.args[2]))


@handles("aten::clamp_min")
def _clamp_min(b: Builder, op: Op) -> Act:
    return _relu_like(b, op, scalar(op.args[1]), None)


@handles("aten::clamp_max")
def _clamp_max(b: Builder, op: Op) -> Act:
    return _relu_like(b, op, None, scalar(op.args[1]))


def _pool(b: Builder, op: Op, x: Act, kernel: tuple, stride: tuple, padding: tuple) -> Act:
    if x.example.dim() != 4:
        raise Refuse("pools a tensor that is not (N, C, H, W)", "pool only feature maps")
    return b.emit(op, AvgPoolNode, [x], kernel=kernel, stride=stride, padding=padding)


@handles("aten::avg_pool2d")
def _avg_pool(b: Builder, op: Op) -> Act:
    """AvgPool2d; ceil_mode, count_include_pad=False with padding and divisor_override are
    refused (they change the divisor at the borders)."""
    kernel, padding = pair(op.args[1]), pair(op.args[3])
    stride = pair(op.args[2]) if op.args[2] else kernel
    if op.args[4]:
        raise Refuse("uses ceil_mode=True (partial windows at the border)",
                     "use ceil_mode=False (pad the input or pick a divisible size)")
    if not op.args[5] and any(padding):
        raise Refuse("uses count_include_pad=False with padding (border windows average "
                     "fewer inputs)", "use count_include_pad=True or no padding, and fine-tune")
    if op.args[6] is not None:
        raise Refuse("uses divisor_override", "remove divisor_override")
    return _pool(b, op, act_arg(op, 0), kernel, stride, padding)


@handles("aten::adaptive_avg_pool2d", "aten::_adaptive_avg_pool2d")
def _adaptive_pool(b: Builder, op: Op) -> Act:
    """AdaptiveAvgPool2d as a fixed AvgPool2d when the input size divides evenly."""
    x = act_arg(op, 0)
    size = tuple(x.example.shape[2:])
    out = [s if o is None else int(o) for s, o in zip(size, pair(op.args[1]))]
    if any(s % o for s, o in zip(size, out)):
        raise Refuse(f"maps {size} to {tuple(out)}, which is not a whole-window pooling "
                     "(windows overlap unevenly)", "use an input size divisible by the "
                     "output size, or a fixed AvgPool2d")
    kernel = (size[0] // out[0], size[1] // out[1])
    return _pool(b, op, x, kernel, kernel, (0, 0))


@handles("aten::mean")
def _mean(b: Builder, op: Op) -> Act:
    """Global average over H and W (keepdim, or followed by an implied flatten)."""
    x = act_arg(op, 0)
    dims = op.args[1] if len(op.args) > 2 and isinstance(op.args[1], (list, tuple)) else None
    if x.example.dim() != 4 or dims is None or sorted(d % 4 for d in dims) != [2, 3]:
        raise Refuse("averages over axes other than H and W",
                     "average only over the spatial axes (global average pooling)")
    pooled = _pool(b, op, x, tuple(x.example.shape[2:]), tuple(x.example.shape[2:]), (0, 0))
    if op.args[2]:
        return pooled
    return b.emit(op, FlattenNode, [replace(pooled, example=op.out[..., None, None])])


@handles("aten::flatten", "aten::view", "aten::reshape", "aten::_unsafe_view", "aten::squeeze")
def _reshape(b: Builder, op: Op) -> Act:
    """A reshape is an alias when it keeps the shape and a FlattenNode when it turns
    (N, C, H, W) into (N, C*H*W); anything else is refused."""
    x = act_arg(op, 0)
    src, dst = tuple(x.example.shape), tuple(op.out.shape)
    if src == dst:
        return replace(x, example=op.out)
    if len(src) == 4 and dst == (src[0], math.prod(src[1:])):
        return b.emit(op, FlattenNode, [x])
    raise Refuse(f"reshapes {src} to {dst}, not a flatten to (N, -1)",
                 "only flatten feature maps to (N, features) before Linear layers")


@handles("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::clone",
         "aten::contiguous", "aten::detach", "aten::alias", "aten::lift_fresh_copy",
         "aten::to", "aten::type_as", "aten::identity")
def _identity(b: Builder, op: Op) -> Act:
    """Ops that do not change the value in eval mode (dropout, copies, float casts)."""
    x = act_arg(op, 0)
    if op.kind.endswith("dropout") and op.args[2]:
        raise Refuse("is active (training mode)", "call model.eval() before saving")
    if op.out.dtype != x.example.dtype:
        raise Refuse(f"casts to {op.out.dtype}", "keep the model in float32")
    return replace(x, example=op.out)


@handles("aten::_assert_tensor_metadata", "aten::_assert_async", "aten::_assert_scalar",
         "aten::sym_constrain_range_for_size")
def _ignore(b: Builder, op: Op) -> None:
    """Export's run-time assertions: no value."""
    return None


# =========================================================================== layout ops
# Slicing, zero padding and concatenation move values without computing: exact linear maps
# that convert folds into the synapses reading them (no neurons of their own).

def _layout_axis(x: Act, dim: Any) -> int:
    """``dim`` as an axis index in [0, ndim) (negative counts from the end)."""
    ndim = x.example.dim()
    if not -ndim <= int(dim) < ndim:
        raise Refuse(f"names axis {dim} of a {ndim}-D tensor", "use an existing axis")
    return int(dim) % ndim


def _no_batch_axis(dim: int) -> None:
    if dim == 0:
        raise Refuse("works across the batch axis (mixes samples)",
                     "slice, pad and concatenate only the channel and spatial axes")


def slice_act(b: Builder, op: Op, x: Act, dim: Any, start: Any, stop: Any,
              step: Any) -> Act:
    """``x[start:stop:step]`` along ``dim`` with Python's bounds (None, negative, clamped): an
    alias when it keeps everything, else a ``SliceNode``."""
    dim, step = _layout_axis(x, dim), 1 if step is None else int(step)
    if step < 1:
        raise Refuse(f"steps by {step} (reverses the axis)", "slice with a positive step")
    size = x.example.shape[dim]
    start, stop, step = slice(start, stop, step).indices(size)
    if (start, step) == (0, 1) and stop >= size:
        return replace(x, example=op.out)
    _no_batch_axis(dim)
    if stop <= start:
        raise Refuse(f"selects nothing (start {start}, stop {stop} on an axis of {size})",
                     "remove the empty slice")
    return b.emit(op, SliceNode, [x], dim=dim, start=start, stop=stop, step=step)


@handles("aten::slice")
def _slice(b: Builder, op: Op) -> Act:
    """``x[:, a:b:s]`` along one axis (TorchScript and torch.export spell every axis)."""
    return slice_act(b, op, act_arg(op, 0), op.args[1], op.args[2], op.args[3], op.args[4])


@handles("aten::narrow")
def _narrow(b: Builder, op: Op) -> Act:
    """``x.narrow(dim, start, length)``: a slice (a negative start counts from the end)."""
    x = act_arg(op, 0)
    dim, start = _layout_axis(x, op.args[1]), int(scalar(op.args[2]))
    start = start + x.example.shape[dim] if start < 0 else start
    return slice_act(b, op, x, dim, start, start + int(op.args[3]), 1)


@handles("aten::pad", "aten::constant_pad_nd")
def _pad(b: Builder, op: Op) -> Act:
    """``F.pad`` with zeros (negative amounts crop); other modes and values are refused."""
    x = act_arg(op, 0)
    mode, value = (op.args[2], op.args[3]) if op.kind == "aten::pad" else ("constant", op.args[2])
    flat, ndim = [int(p) for p in op.args[1]], x.example.dim()
    if len(flat) % 2 or len(flat) > 2 * ndim:
        raise Refuse(f"has {len(flat)} pad amounts for a {ndim}-D tensor",
                     "give (before, after) pairs, last axis first")
    pads = [(0, 0)] * ndim
    for i in range(len(flat) // 2):
        pads[ndim - 1 - i] = (flat[2 * i], flat[2 * i + 1])
    if not any(v for pair in pads for v in pair):
        return replace(x, example=op.out)
    if mode != "constant":
        raise Refuse(f"pads by repeating the tensor's own values (mode {mode!r}): linear, but "
                     "neither a convolution nor a per-channel bias", "pad with zeros "
                     "(mode 'constant', value 0), e.g. F.pad(x, pad)")
    if scalar(value) not in (None, 0.0):
        raise Refuse(f"pads with the constant {scalar(value)}: an offset that differs between "
                     "positions, not a linear map", "pad with 0")
    _no_batch_axis(next(d for d, pair in enumerate(pads) if any(pair)))
    return b.emit(op, PadNode, [x], pads=tuple(pads[1:]))


@handles("aten::cat", "aten::concat", "aten::concatenate")
def _cat(b: Builder, op: Op) -> Act:
    """``torch.cat`` of activations along a channel or spatial axis."""
    parts = list(op.args[0])
    if not all(isinstance(p, Act) for p in parts):
        raise Refuse("concatenates an activation with a constant tensor",
                     "concatenate activations only (fold constants into a bias)")
    dim = _layout_axis(parts[0], op.args[1])
    if len(parts) == 1:
        return replace(parts[0], example=op.out)
    _no_batch_axis(dim)
    return b.emit(op, ConcatNode, parts, dim=dim)
