"""ANN (``AnnGraph``) -> float spiking network (``SnnGraph``): structure and thresholds.

Structure
    Every ``ReluNode`` and ``QcfsNode`` becomes a ``NeuronLayer`` of integrate-and-fire neurons
    with reset by subtraction (same name and origin); the model output (the final
    ``LinearNode``) becomes the non-spiking readout layer. A layer's input current is the ANN
    pre-activation, written as a sum of ``Synapse`` maps from upstream populations (or
    ``ir.INPUT``)::

        z_l = sum_paths  L_path(out_src) + b_l        (b_l per channel -> NeuronLayer.bias)

    Walking back from an activation, each path from a source passes through linear nodes
    only: pools, flattens, layout ops (slices, zero pads) and exactly one weighted op
    (Conv/Linear), or none (an identity, pool-only or option-A residual shortcut). ``Add``
    nodes give one synapse per incoming path; a ``Concat`` gives each input its own paths,
    each through a zero pad that embeds it at its offset (so the sum of the paths is the
    concatenation). A path is folded into one synapse exactly:

    * conv-shaped target: the chain of (depthwise) pools and the conv are composed into one
      conv kernel. For ``A`` then ``B`` (per spatial axis, s stride, d dilation, p padding)::

          W[r] = sum_{s_A d_B v + d_A u = r} B[v] A[u],  stride s_A s_B,  padding p_A + s_A p_B

      and the result is checked numerically (float64) against the chain itself; a chain that
      does not fold (e.g. padded pooling after a conv) is reported, never approximated.
      Layout ops are convs too: a spatial slice start:stop:step is a kernel with one tap of 1
      at ``start`` and stride ``step`` (trailing zero taps trim the end), a spatial zero pad
      (before, after) a one-tap kernel with symmetric padding max(before, after, 0) (so
      asymmetric pads fold; a crop folds unless padding follows it), and a channel slice
      or pad a 1x1 selection matrix (an option-A shortcut is thus a 1x1 stride-2 conv with
      zero rows for the new channels).
    * flat target: the dense matrix is the Jacobian of the (linear) chain, computed exactly.

    The affine offset of the chain (biases pushed through pools/adds) must be constant per
    channel; it becomes ``NeuronLayer.bias``.

Thresholds (per channel, from ``x_calib`` = training data only)
    ``max``: channel max. ``percentile``: that percentile of the channel's values.
    ``mse``: theta = f * max for the candidate fraction f in {1.00, 0.99, ..., 0.05} that
    minimises  sum (a - q_T(a; theta))^2  with the T-step rate quantiser of this network::

        q_T(a; theta) = clip(floor(a T / theta + o), 0, T) * theta / T,   o = v_init + shift

    (``shift`` = 1/2 when ``input_shift``): the spike count after T steps of an IF neuron with
    constant input a, v0 = v_init * theta and reset by subtraction. So thresholds depend on T.
    Clipped ReLUs use their clip for all channels. QCFS activations (``QcfsNode``) keep their
    learned threshold, per channel, with v_init = 1/2 and no input shift whatever the options
    say (QCFS's conversion; the IF neuron then equals the activation after T = L steps); they
    are listed in ``meta["learned_thresholds"]``. Fallbacks: a channel whose activation is 0 on
    all calibration data gets the layer's largest threshold (1.0 when the whole layer is
    silent), recorded in ``meta["fallback_channels"]``; a channel whose percentile/mse
    threshold is 0 while its max is not gets its max (not recorded: its threshold still comes
    from its own data). Never a threshold of 0. ``threshold_scale`` (default 1) multiplies
    every searched threshold (not the clips, learned QCFS thresholds or the readout's): the
    per-layer MSE weighs a clipped activation's one-signed error, which the layers add up,
    like rounding's, so at small T a scale above 1 can suit the whole network better
    (bench/README.md, "Accuracy on residual networks", part 17).

Encoding
    Constant input: the analog (normalised) sample enters the first synapses at every step.
    ``v_init`` (fraction of threshold, default 0.5): v[0] = v_init * theta, which turns the
    T-step spike count from floor(a T / theta) into round(a T / theta) at *every* step t, so the
    running rate is unbiased from t = 1 on. ``input_shift`` (default False): the authors' trick
    of adding theta / (2T) to every step's bias (here: ``NeuronLayer.bias``); after T steps it
    has the same rounding effect as v_init = 0.5 but is biased low at every t < T (the shift has
    not accumulated yet), and combined with v_init = 0.5 it over-rounds. Measured on digits
    (3-spiking-layer CNN, ANN 94.7 %, 360 test images, accuracy at t = T for T = 1/2/8/32):
    v_init 0.5: 72.2/89.2/92.5/94.4; shift only: 72.2/77.2/92.8/94.4; both: 8.3/11.7/82.8/93.1;
    neither: 8.3/66.9/88.6/93.9; at t = T/2 v_init 0.5 leads by 1-60 points. Hence the
    defaults v_init = 0.5, input_shift = False.

Neuron
    ``neuron="if"`` (default): the paper's integrate-and-fire neuron. ``neuron="signed"``: every
    spiking layer (not the readout) is a signed neuron (``NeuronLayer.signed``,
    ``sims.reference``), which also sends -1, adding theta back, when its membrane is below 0
    and its net spike count is positive: it can take back a spike that early input made it
    send, which a per-channel bias cannot (bench/README.md, "Accuracy on residual networks").
    Thresholds are searched the same way for both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core import distributed
from core.errors import InputError, UnsupportedModelError
from core.ir import (INPUT, AddNode, AnnGraph, AnnNode, AvgPoolNode, ConcatNode, ConvNode,
                     FlattenNode, InputNode, InputSpec, LinearNode, NeuronLayer, PadNode,
                     QcfsNode, ReluNode, SliceNode, SnnGraph, Synapse, SynapseKind,
                     frozen_array)
from toolchain.ann import EVALUATORS, ann_forward

THRESHOLD_METHODS = ("max", "percentile", "mse")
MSE_FRACTIONS = tuple(1.0 - 0.01 * i for i in range(96))  # the authors' candidate grid
LINEAR_OPS = (ConvNode, LinearNode, AvgPoolNode, FlattenNode, SliceNode, PadNode)
WEIGHTED_OPS = (ConvNode, LinearNode)
ACTIVATIONS = (ReluNode, QcfsNode)
SOURCES = ACTIVATIONS + (InputNode,)
QCFS_V_INIT = 0.5  # QCFS's prescription: v[0] = theta / 2 makes T = L steps exact
DEFAULT_V_INIT = 0.5
DEFAULT_INPUT_SHIFT = False
NEURONS = ("if", "signed")
SEARCH_BLOCK_VALUES = 1 << 23  # values per block of the threshold search (64 MB in float64)
FOLD_RTOL = 1e-9


class _Problem(Exception):
    """One unsupported construct (collected, then raised together)."""


@dataclass(frozen=True)
class _Path:
    """Linear ops from ``source`` (a ReLU name or INPUT) to a target, in application order."""
    source: str
    ops: tuple[AnnNode, ...]


# --------------------------------------------------------------------------- public API

def convert(ann: AnnGraph, x_calib: np.ndarray, *, timesteps: int, threshold: str = "mse",
            percentile: float = 99.99, v_init: float = DEFAULT_V_INIT,
            input_shift: bool = DEFAULT_INPUT_SHIFT, calib_samples: int = 1024,
            batch_size: int = 256, neuron: str = "if",
            threshold_scale: float = 1.0) -> SnnGraph:
    """Convert ``ann`` to an SnnGraph with T = ``timesteps`` (see the module docstring).

    ``x_calib`` (N, *input shape), training data only; its first ``calib_samples`` samples set
    the thresholds. Raises UnsupportedModelError listing every construct that cannot be
    expressed, InputError for bad options."""
    _check_options(timesteps, threshold, percentile, v_init, threshold_scale)
    if neuron not in NEURONS:
        raise InputError(f"neuron must be one of {', '.join(NEURONS)}, got {neuron!r}")
    shapes = node_shapes(ann)
    structure = _structure(ann, shapes)
    acts = _activations(ann, x_calib[:calib_samples], [s.name for s in structure[:-1]],
                        batch_size)
    offset = v_init + (0.5 if input_shift else 0.0)
    layers, fallbacks = [], {}
    for spec in structure:
        theta, fb = _layer_threshold(spec, acts.pop(spec.name, None), threshold,
                                     percentile, timesteps, offset, threshold_scale)
        if fb:
            fallbacks[spec.name] = fb
        layers.append(_neuron_layer(spec, theta, v_init, input_shift, timesteps,
                                    signed=neuron == "signed" and not spec.readout))
    node = ann.input
    meta = {"threshold_method": threshold, "percentile": float(percentile),
            "threshold_scale": float(threshold_scale),
            "timesteps": int(timesteps), "v_init": float(v_init),
            "input_shift": bool(input_shift), "neuron": neuron, "fallback_channels": fallbacks,
            "calib_samples": int(min(len(x_calib), calib_samples)),
            "learned_thresholds": _learned_meta(structure)}
    return SnnGraph(input=InputSpec(tuple(node.shape), node.mean, node.std),
                    layers=tuple(layers), timesteps=int(timesteps), meta=meta)


def node_shapes(ann: AnnGraph) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every node, from one float64 forward of zeros."""
    x = torch.zeros((1,) + tuple(ann.input.shape), dtype=torch.float64)
    _, values = ann_forward(ann, x, record=True, dtype=torch.float64)
    return {name: tuple(v.shape[1:]) for name, v in values.items()}


def activation_nodes(ann: AnnGraph) -> list[AnnNode]:
    """The ReLU and QCFS nodes that become spiking layers, in topological order."""
    return [n for n in ann.nodes if isinstance(n, ACTIVATIONS)]


def _compact(values: np.ndarray) -> float | list[float]:
    """One number when every channel has the same value (a per-layer threshold)."""
    values = [float(v) for v in values]
    return values[0] if len(set(values)) == 1 else values


def _learned_meta(structure: list) -> dict:
    """QCFS layers: threshold taken from the model (no search), v_init 1/2, levels L."""
    return {s.name: {"source": "QCFS (learned)", "levels": s.levels, "v_init": QCFS_V_INIT,
                     "threshold": _compact(s.learned)}
            for s in structure if s.learned is not None}


# --------------------------------------------------------------------------- options

def _check_options(timesteps: int, threshold: str, percentile: float, v_init: float,
                   threshold_scale: float) -> None:
    problems = []
    if int(timesteps) < 1:
        problems.append(f"timesteps must be >= 1, got {timesteps}")
    if threshold not in THRESHOLD_METHODS:
        problems.append(f"threshold must be one of {THRESHOLD_METHODS}, got {threshold!r}")
    if not 0.0 < percentile <= 100.0:
        problems.append(f"percentile must be in (0, 100], got {percentile}")
    if not 0.0 <= v_init < 1.0:
        problems.append(f"v_init must be in [0, 1) (a fraction of the threshold), got {v_init}")
    if not (np.isfinite(threshold_scale) and threshold_scale > 0):
        problems.append(f"threshold_scale must be a finite number > 0, got {threshold_scale}")
    if problems:
        raise InputError("; ".join(problems))


# --------------------------------------------------------------------------- structure

@dataclass(frozen=True)
class _LayerSpec:
    """Structure of one layer before thresholds are known."""
    name: str
    origin: str
    shape: tuple[int, ...]
    synapses: tuple[Synapse, ...]
    bias: np.ndarray
    clip: float | None
    readout: bool
    learned: np.ndarray | None = None  # QCFS: the model's own per-channel threshold
    levels: int | None = None


def _structure(ann: AnnGraph, shapes: dict) -> list[_LayerSpec]:
    """One spec per activation plus the readout; every problem collected, raised once."""
    problems: list[str] = []
    specs = []
    targets = [(n, False) for n in activation_nodes(ann)] + [(_readout_node(ann), True)]
    for node, readout in targets:
        try:
            specs.append(_layer_spec(ann, shapes, node, readout))
        except _Problem as exc:
            problems.extend(str(exc).split("\n"))
    if problems:
        raise UnsupportedModelError(problems)
    return specs


def _readout_node(ann: AnnGraph) -> AnnNode:
    node = ann.node(ann.output)
    if isinstance(node, SOURCES):
        raise UnsupportedModelError([
            f"{node.name} ({node.origin}): the model output is an activation; end the model "
            "with a Linear layer (logits) that becomes the non-spiking readout"])
    return node


def _layer_spec(ann: AnnGraph, shapes: dict, node: AnnNode, readout: bool) -> _LayerSpec:
    """Synapses and per-channel bias of the layer fed by ``node``'s input (or ``node``)."""
    z_name = node.name if readout else node.inputs[0]
    shape = shapes[z_name]
    if readout and len(shape) != 1:
        raise _Problem(f"{node.name} ({node.origin}): the model output has shape {shape}; "
                       "the readout must be flat logits (end with Flatten + Linear)")
    paths = _paths(ann, z_name, shapes)
    syns, problems = [], []
    for path in paths:
        try:
            syns.append(_synapse(path, shapes, shape, node))
        except _Problem as exc:
            problems.append(str(exc))
    if problems:
        raise _Problem("\n".join(problems))
    bias = _channel_bias(ann, z_name, shapes, node)
    qcfs = isinstance(node, QcfsNode)
    clip = None if readout or qcfs else node.clip
    return _LayerSpec(node.name, node.origin, shape, tuple(syns), bias, clip, readout,
                      np.broadcast_to(node.threshold, shape[:1]) if qcfs else None,
                      node.levels if qcfs else None)


def _source_name(node: AnnNode) -> str:
    return INPUT if isinstance(node, InputNode) else node.name


def _paths(ann: AnnGraph, name: str, shapes: dict) -> list[_Path]:
    """All paths of linear ops from sources (ReLUs, the input) into node ``name``."""
    node = ann.node(name)
    if isinstance(node, SOURCES):
        return [_Path(_source_name(node), ())]
    if isinstance(node, AddNode):
        return [p for i in node.inputs for p in _paths(ann, i, shapes)]
    if isinstance(node, ConcatNode):
        return [_Path(p.source, p.ops + (embed,)) for embed in _concat_embeddings(node, shapes)
                for p in _paths(ann, embed.inputs[0], shapes)]
    if isinstance(node, LINEAR_OPS):
        return [_Path(p.source, p.ops + (node,)) for p in _paths(ann, node.inputs[0], shapes)]
    raise _Problem(f"{node.name} ({node.origin}): {type(node).__name__} cannot be part of an "
                   "integrate-and-fire layer's input; replace it by a supported op")


def _concat_embeddings(node: ConcatNode, shapes: dict) -> list[PadNode]:
    """One zero pad per input of ``node`` placing it at its offset along the concat axis:
    the concatenation is the sum of the padded inputs."""
    total = shapes[node.name][node.dim - 1]
    pads, offset = [], 0
    for i, name in enumerate(node.inputs):
        size = shapes[name][node.dim - 1]
        axes = [(0, 0)] * len(shapes[name])
        axes[node.dim - 1] = (offset, total - offset - size)
        pads.append(PadNode(f"{node.name}[{i}]", (name,), node.origin, tuple(axes)))
        offset += size
    return pads


def _synapse(path: _Path, shapes: dict, shape: tuple, target: AnnNode) -> Synapse:
    weighted = [op for op in path.ops if isinstance(op, WEIGHTED_OPS)]
    if len(weighted) > 1:
        names = ", ".join(f"{op.name} ({op.origin})" for op in weighted)
        raise _Problem(f"{target.name} ({target.origin}): weighted ops {names} follow each "
                       "other without an activation; insert an activation between them or "
                       "fuse them into one layer before conversion")
    src_shape = shapes[path.ops[0].inputs[0]] if path.ops else shape
    if len(shape) == 1:
        return Synapse(path.source, SynapseKind.DENSE, frozen_array(_dense_matrix(path, src_shape)))
    if len(src_shape) != 3:
        raise _Problem(f"{target.name} ({target.origin}): a flat source feeds a conv-shaped "
                       "layer; this cannot be expressed as a synapse")
    return _conv_synapse(path, shapes, shape, target)


# --------------------------------------------------------------------------- linear maps

def _linear_part(node: AnnNode, x: torch.Tensor) -> torch.Tensor:
    """The node's linear map without its bias (pools and flatten are linear already)."""
    if isinstance(node, ConvNode):
        w = torch.tensor(np.asarray(node.weight), dtype=x.dtype)
        return F.conv2d(x, w, None, node.stride, node.padding, node.dilation, node.groups)
    if isinstance(node, LinearNode):
        return F.linear(x, torch.tensor(np.asarray(node.weight), dtype=x.dtype))
    return EVALUATORS[type(node)](node, [x])


def _chain(ops: tuple[AnnNode, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = _linear_part(op, x)
        return x
    return apply


def _dense_matrix(path: _Path, src_shape: tuple) -> np.ndarray:
    """Exact (O, prod(src_shape)) matrix of the linear chain f, float64: columns f(e_j) by
    pushing basis inputs through f, or rows (f^T e_o) by autograd when O is the smaller."""
    f = _chain(path.ops)
    flat = int(np.prod(src_shape))
    out = int(f(torch.zeros((1,) + tuple(src_shape), dtype=torch.float64)).numel())
    chunk = max(1, (1 << 22) // max(flat, out))
    if flat <= out:
        cols = [f(torch.eye(flat, dtype=torch.float64)[j:j + chunk].reshape(
            (-1,) + tuple(src_shape))).reshape(-1, out) for j in range(0, flat, chunk)]
        return torch.cat(cols).T.numpy()
    return np.concatenate([_rows(f, src_shape, o, min(o + chunk, out), out)
                           for o in range(0, out, chunk)])


def _rows(f: Callable, src_shape: tuple, o0: int, o1: int, out: int) -> np.ndarray:
    """Rows o0..o1-1 of the chain's matrix: gradients of <f(x), e_o> (adjoint of f)."""
    with torch.enable_grad():
        x = torch.zeros((o1 - o0,) + tuple(src_shape), dtype=torch.float64,
                        requires_grad=True)
        pick = torch.eye(out, dtype=torch.float64)[o0:o1]
        (f(x).reshape(o1 - o0, out) * pick).sum().backward()
    return x.grad.reshape(o1 - o0, -1).numpy()


@dataclass(frozen=True)
class _ConvMap:
    """A conv-shaped linear map. ``weight`` (O, I, kh, kw) when ``depthwise`` is False, else
    (C, 1, kh, kw) acting channel by channel."""
    weight: np.ndarray
    depthwise: bool
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)


def _identity_map(channels: int) -> _ConvMap:
    return _ConvMap(np.ones((channels, 1, 1, 1)), True)


def _op_map(op: AnnNode, channels: int) -> _ConvMap:
    if isinstance(op, AvgPoolNode):
        kh, kw = op.kernel
        w = np.full((channels, 1, kh, kw), 1.0 / (kh * kw))
        return _ConvMap(w, True, tuple(op.stride), tuple(op.padding))
    if not isinstance(op, ConvNode):
        raise _Problem(f"{op.name} ({op.origin}): {type(op).__name__} inside a conv path")
    w = np.asarray(op.weight, dtype=np.float64)
    geometry = (tuple(op.stride), tuple(op.padding), tuple(op.dilation))
    if op.groups == 1:
        return _ConvMap(w, False, *geometry)
    if op.groups == channels == w.shape[0]:
        return _ConvMap(w, True, *geometry)
    return _ConvMap(_ungroup(w, op.groups), False, *geometry)


def _ungroup(w: np.ndarray, groups: int) -> np.ndarray:
    """Grouped conv weight (O, I/g, kh, kw) -> equivalent dense (O, I, kh, kw)."""
    o, ipg = w.shape[:2]
    full = np.zeros((o, ipg * groups) + w.shape[2:])
    opg = o // groups
    for g in range(groups):
        full[g * opg:(g + 1) * opg, g * ipg:(g + 1) * ipg] = w[g * opg:(g + 1) * opg]
    return full


def _mix(b_tap: np.ndarray, b_depthwise: bool, a: _ConvMap) -> tuple[np.ndarray, bool]:
    """One tap of B (matrix (O, M) or vector (M,)) applied to all of A's kernel."""
    if b_depthwise:
        return b_tap[:, None, None, None] * a.weight, a.depthwise
    if a.depthwise:
        return b_tap[:, :, None, None] * a.weight[:, 0][None], False
    return np.einsum("om,mcuv->ocuv", b_tap, a.weight), False


def _compose(a: _ConvMap, b: _ConvMap) -> _ConvMap:
    """The map ``B(A(x))`` as one conv (formula in the module docstring)."""
    (ka_h, ka_w), (kb_h, kb_w) = a.weight.shape[2:], b.weight.shape[2:]
    size = [a.dilation[i] * (k_a - 1) + a.stride[i] * b.dilation[i] * (k_b - 1) + 1
            for i, (k_a, k_b) in enumerate(((ka_h, kb_h), (ka_w, kb_w)))]
    depthwise = a.depthwise and b.depthwise
    in_c = 1 if depthwise else a.weight.shape[0] if a.depthwise else a.weight.shape[1]
    weight = np.zeros((b.weight.shape[0], in_c, size[0], size[1]))
    for vh in range(kb_h):
        for vw in range(kb_w):
            tap = b.weight[:, 0, vh, vw] if b.depthwise else b.weight[:, :, vh, vw]
            part, _ = _mix(tap, b.depthwise, a)
            oh, ow = a.stride[0] * b.dilation[0] * vh, a.stride[1] * b.dilation[1] * vw
            weight[:, :, oh:oh + a.dilation[0] * (ka_h - 1) + 1:a.dilation[0],
                   ow:ow + a.dilation[1] * (ka_w - 1) + 1:a.dilation[1]] += part
    stride = (a.stride[0] * b.stride[0], a.stride[1] * b.stride[1])
    padding = (a.padding[0] + a.stride[0] * b.padding[0],
               a.padding[1] + a.stride[1] * b.padding[1])
    return _ConvMap(weight, depthwise, stride, padding)


def _maps(op: AnnNode, in_shape: tuple) -> list[_ConvMap]:
    """``op`` as conv maps applied in order (a layout op may need two: spatial, channel)."""
    layout = LAYOUT_MAPS.get(type(op))
    return layout(op, in_shape) if layout else [_op_map(op, in_shape[0])]


def _conv_synapse(path: _Path, shapes: dict, shape: tuple, target: AnnNode) -> Synapse:
    """Fold the path into one conv synapse and verify it against the chain (float64)."""
    src_shape = shapes[path.ops[0].inputs[0]] if path.ops else shape
    m = _identity_map(src_shape[0])
    for op in path.ops:
        for step in _maps(op, shapes[op.inputs[0]]):
            m = _compose(m, step)
    has_weighted = any(isinstance(op, ConvNode) for op in path.ops)
    weight, groups = (m.weight, src_shape[0]) if m.depthwise and has_weighted else (
        _expand_depthwise(m) if m.depthwise else m.weight, 1)
    syn = Synapse(path.source, SynapseKind.CONV, frozen_array(weight), m.stride, m.padding, (1, 1),
                  groups)
    _verify_fold(path, syn, src_shape, shape, target)
    return syn


def _one_tap(channels: int, kernel: tuple[int, int], tap: tuple[int, int],
             stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0)) -> _ConvMap:
    """Depthwise kernel of zeros with a single 1 at ``tap``: out = x shifted and strided."""
    w = np.zeros((channels, 1) + tuple(kernel))
    w[:, 0, tap[0], tap[1]] = 1.0
    return _ConvMap(w, True, stride, padding)


def _channel_map(rows: int, cols: int, pick: Callable[[int], int]) -> _ConvMap:
    """1x1 conv whose output channel j is input channel pick(j) (zero when out of range)."""
    w = np.zeros((rows, cols, 1, 1))
    for j in range(rows):
        if 0 <= pick(j) < cols:
            w[j, pick(j), 0, 0] = 1.0
    return _ConvMap(w, False)


def _slice_maps(op: SliceNode, in_shape: tuple) -> list[_ConvMap]:
    """start:stop:step along C (selection matrix) or H/W: one tap at ``start``, stride
    ``step``, and a kernel just long enough that exactly len(range(start, stop, step))
    windows fit (taps after the first are zero)."""
    count = len(range(op.start, op.stop, op.step))
    if op.dim == 1:
        return [_channel_map(count, in_shape[0], lambda j: op.start + j * op.step)]
    axis, size = op.dim - 2, in_shape[op.dim - 1]
    kernel, tap, stride = [1, 1], [0, 0], [1, 1]
    kernel[axis] = max(op.start + 1, size - op.step * count + 1)
    tap[axis], stride[axis] = op.start, op.step
    return [_one_tap(in_shape[0], tuple(kernel), tuple(tap), tuple(stride))]


def _pad_maps(op: PadNode, in_shape: tuple) -> list[_ConvMap]:
    """Zero pad (crop when negative): H/W by a one-tap kernel with symmetric padding
    p = max(before, after, 0), kernel 2p - before - after + 1, tap p - before; C by an
    embedding matrix."""
    (c0, c1), *spatial = op.pads
    maps = []
    if any(v for pair in spatial for v in pair):
        pad = [max(b, a, 0) for b, a in spatial]
        kernel = [2 * p - b - a + 1 for p, (b, a) in zip(pad, spatial)]
        tap = [p - b for p, (b, _) in zip(pad, spatial)]
        maps.append(_one_tap(in_shape[0], tuple(kernel), tuple(tap), padding=tuple(pad)))
    if c0 or c1:
        maps.append(_channel_map(in_shape[0] + c0 + c1, in_shape[0], lambda j: j - c0))
    return maps or [_identity_map(in_shape[0])]


LAYOUT_MAPS: dict[type, Callable[[AnnNode, tuple], list[_ConvMap]]] = {
    SliceNode: _slice_maps, PadNode: _pad_maps}


def _expand_depthwise(m: _ConvMap) -> np.ndarray:
    """Depthwise (C, 1, kh, kw) -> dense (C, C, kh, kw) (identity / pool-only shortcuts)."""
    c = m.weight.shape[0]
    full = np.zeros((c, c) + m.weight.shape[2:])
    full[np.arange(c), np.arange(c)] = m.weight[:, 0]
    return full


def _verify_fold(path: _Path, syn: Synapse, src_shape: tuple, shape: tuple,
                 target: AnnNode) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2,) + tuple(src_shape), generator=gen, dtype=torch.float64)
    want = _chain(path.ops)(x)
    w = torch.from_numpy(np.array(syn.weight))  # copy: IR arrays are read-only
    got = (F.conv2d(x, w, None, syn.stride, syn.padding, syn.dilation, syn.groups)
           if _fits(x, syn, shape) else None)
    if got is None or got.shape != want.shape or not torch.allclose(
            got, want, rtol=FOLD_RTOL, atol=FOLD_RTOL * float(want.abs().max() + 1)):
        names = ", ".join(f"{op.name} ({op.origin})" for op in path.ops)
        raise _Problem(f"{target.name} ({target.origin}): the linear chain {names} does not "
                       "fold into one convolution (padding after a conv or pool, or a crop "
                       "followed by padding, makes border values no single convolution "
                       "computes); pad right after an activation, crop after the conv, use "
                       "unpadded pooling, or put an activation between")


def _fits(x: torch.Tensor, syn: Synapse, shape: tuple) -> bool:
    kh, kw = syn.weight.shape[2:]
    return all(x.shape[2 + i] + 2 * syn.padding[i] >= k for i, k in enumerate((kh, kw)))


def _channel_bias(ann: AnnGraph, z_name: str, shapes: dict, target: AnnNode) -> np.ndarray:
    """The affine offset of ``z`` (all sources zero) as one value per channel."""
    offset = _offset(ann, z_name, shapes, {})[0].numpy()
    if offset.ndim == 1:
        return frozen_array(offset)
    per_channel = offset.reshape(offset.shape[0], -1)
    first = per_channel[:, :1]
    if not np.allclose(per_channel, first, rtol=FOLD_RTOL, atol=FOLD_RTOL):
        raise _Problem(f"{target.name} ({target.origin}): the bias reaching this layer is not "
                       "constant per channel (zero padding or padded pooling after a biased "
                       "layer); pad only activations (after the ReLU), or remove the padding")
    return frozen_array(first[:, 0])


def _offset(ann: AnnGraph, name: str, shapes: dict, memo: dict) -> torch.Tensor:
    """Value of node ``name`` when every source (ReLU, input) outputs zero (batch of 1)."""
    if name in memo:
        return memo[name]
    node = ann.node(name)
    if isinstance(node, SOURCES):
        value = torch.zeros((1,) + shapes[name], dtype=torch.float64)
    else:
        ins = [_offset(ann, i, shapes, memo) for i in node.inputs]
        value = EVALUATORS[type(node)](node, ins)
    memo[name] = value
    return value


# --------------------------------------------------------------------------- thresholds

@torch.no_grad()
def _activations(ann: AnnGraph, x: np.ndarray, names: list[str],
                 batch_size: int) -> dict[str, torch.Tensor]:
    """ANN activations (N, *shape) float32 of the named nodes on ``x``. Data-parallel: each
    rank runs its share of the forward chunks and every rank gets all the values back in
    sample order (``core.distributed``: thresholds need every value of a channel)."""
    if len(x) == 0:
        raise InputError("convert needs calibration samples (x_calib is empty)")
    mine = distributed.shard(len(x), align=batch_size)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(mine.start, mine.stop, batch_size):
        _, values = ann_forward(ann, x[start:min(start + batch_size, mine.stop)], record=True)
        for n in names:
            parts[n].append(values[n])
    if not parts or not parts[names[0]]:  # an idle rank (fewer chunks than ranks)
        _, values = ann_forward(ann, x[:0], record=True)
        parts = {n: [values[n]] for n in names}
    # one layer's pieces at a time next to their concatenation, not every layer's twice
    return {n: distributed.gather_rows(torch.cat(parts.pop(n))) for n in list(parts)}


def channel_values(act: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) -> (C, N * spatial): every value of each channel."""
    return act.transpose(0, 1).reshape(act.shape[1], -1)


def threshold_mse(values: torch.Tensor, timesteps: int, offset: float) -> torch.Tensor:
    """Per-channel theta = f * max minimising sum (a - q_T(a; theta))^2 over f in the grid,
    q_T(a; theta) = clamp(floor(a T / theta + offset), 0, T) * theta / T.

    Exact over all values, without one pass per candidate: with each channel's values sorted
    and prefix sums of a and a^2, the values on quantization level k are one contiguous run
    (found by ``searchsorted`` at the level boundaries (k - offset) theta / T), whose error
    is sum a^2 - 2 l sum a + n l^2 with l = k theta / T. Cost: one sort plus
    O(candidates x T x log n) per channel. Ties go to the first (largest) fraction."""
    chans, steps = values.shape[0], timesteps
    a = values.sort(dim=1).values.contiguous()
    vmax = a[:, -1].clamp(min=1e-30)
    zero = torch.zeros(chans, 1, dtype=a.dtype)
    s1, s2 = (torch.cat([zero, v.cumsum(1)], 1) for v in (a, a * a))
    theta = vmax[:, None] * torch.tensor(MSE_FRACTIONS, dtype=a.dtype)[None, :]   # (C, F)
    levels = torch.arange(0, steps + 1, dtype=a.dtype)
    bounds = (levels[1:] - offset)[None, None, :] * theta[:, :, None] / steps      # (C, F, T)
    idx = torch.searchsorted(a, bounds.reshape(chans, -1).contiguous()).reshape(bounds.shape)
    n = torch.full(idx.shape[:2] + (1,), a.shape[1], dtype=idx.dtype)
    ends = torch.cat([idx, n], 2)                                                   # (C, F, T+1)
    starts = torch.cat([torch.zeros_like(n), idx], 2)

    def run_sum(prefix: torch.Tensor) -> torch.Tensor:
        take = lambda i: prefix.gather(1, i.reshape(chans, -1)).reshape(i.shape)  # noqa: E731
        return take(ends) - take(starts)

    level = levels[None, None, :] * theta[:, :, None] / steps
    err = (run_sum(s2) - 2 * level * run_sum(s1) + (ends - starts) * level ** 2).sum(2)
    return theta.gather(1, err.argmin(1, keepdim=True))[:, 0]


def _raw_threshold(values: torch.Tensor, method: str, percentile: float, timesteps: int,
                   offset: float) -> np.ndarray:
    """Per-channel thresholds, searched over blocks of channels of at most
    ``SEARCH_BLOCK_VALUES`` values: each channel's search is independent, so blocking
    changes no threshold, and the float64 workspace (the block's values, their sorted copy
    and two prefix sums) stays bounded whatever the layer's width and the calibration
    set's size."""
    if method == "max":
        return values.max(1).values.double().numpy()
    step = max(1, SEARCH_BLOCK_VALUES // max(1, values.shape[1]))
    blocks = []
    for c in range(0, values.shape[0], step):
        block = values[c:c + step].double()
        blocks.append(np.percentile(block.numpy(), percentile, axis=1)
                      if method == "percentile"
                      else threshold_mse(block, timesteps, offset).numpy())
    return np.concatenate(blocks)


def _layer_threshold(spec: _LayerSpec, act: torch.Tensor | None, method: str,
                     percentile: float, timesteps: int, offset: float, scale: float
                     ) -> tuple[np.ndarray, list[int]]:
    """Thresholds of one layer (searched ones times ``scale``) and the channels that needed
    a fallback."""
    channels = spec.shape[0]
    if spec.readout:
        return np.ones(channels), []
    if spec.learned is not None:
        return np.array(spec.learned, np.float64), []
    if spec.clip is not None:
        return np.full(channels, float(spec.clip)), []
    values = channel_values(act)
    vmax = values.max(1).values.double().numpy()
    theta = _raw_threshold(values, method, percentile, timesteps, offset)
    theta = np.where((theta <= 0) & (vmax > 0), vmax, theta) * scale
    silent = vmax <= 0
    fill = float(theta[~silent].max()) if (~silent).any() else 1.0
    return np.where(silent, fill, theta), [int(c) for c in np.flatnonzero(silent)]


def _neuron_layer(spec: _LayerSpec, theta: np.ndarray, v_init: float, input_shift: bool,
                  timesteps: int, signed: bool = False) -> NeuronLayer:
    """bias = ANN bias (+ theta / (2T) with input_shift); readout: v_init 0, threshold 1;
    QCFS: v_init 1/2 and no shift, as QCFS prescribes."""
    channels = spec.shape[0]
    qcfs = spec.learned is not None
    shift = theta / (2.0 * timesteps) if (input_shift and not spec.readout and not qcfs) else 0.0
    v0 = 0.0 if spec.readout else QCFS_V_INIT if qcfs else v_init
    return NeuronLayer(name=spec.name, shape=tuple(spec.shape), synapses=spec.synapses,
                       bias=frozen_array(spec.bias + shift), threshold=frozen_array(theta),
                       v_init=frozen_array(np.full(channels, v0)), bias_schedule=None,
                       readout=spec.readout, clip=spec.clip, origin=spec.origin,
                       signed=signed)
