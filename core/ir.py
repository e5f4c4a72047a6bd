"""The one intermediate representation every stage consumes and returns anew.

Three graph levels, all frozen dataclasses holding read-only numpy arrays (no torch here, so
exporters can import this module without torch):

``AnnGraph``
    The traced ANN, op by op, in topological order. Produced by ``toolchain.trace``,
    evaluated by ``toolchain.ann``.

``SnnGraph``
    Populations of integrate-and-fire neurons (``NeuronLayer``), each fed by a sum of linear
    ``Synapse`` maps (conv or dense) from upstream populations or from the analog input.
    Float. Produced by ``toolchain.convert``; changed by ``toolchain.calibrate`` (bias
    schedules) and ``toolchain.normalize`` (thresholds to 1).

    Neuron equation of layer l, channel c, step t = 1..T (float, paper eq. 4)::

        I[t]  = sum_syn W_syn * out_src[t]                (out_src = theta_src * s_src[t],
                                                            or the analog input x every step)
        v[t]  = v[t-1] + I[t] + bias[c] + bias_schedule[t-1, c]
        s[t]  = v[t] >= threshold[c]                      (spiking layers)
        v[t]  = v[t] - threshold[c] * s[t]                (reset by subtraction)
        v[0]  = v_init[c] * threshold[c]

    A readout layer (``readout=True``, the final Linear) does not spike: its output after
    step t is v[t] (the accumulated input), and the prediction is its argmax.

``QuantGraph``
    The same populations as integers for a hardware target (``exporters.quantize``). Its
    arithmetic is specified, step by step, in ``sims.reference``.

Arrays are made read-only by ``frozen_array``; dataclasses compare by identity of arrays
(``eq=False``) and are compared structurally with ``graphs_equal``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass, replace
from enum import StrEnum
from typing import Any, Mapping

import numpy as np

INPUT = "input"  # name of the analog input source in Synapse.source


def frozen_array(x: Any, dtype: Any = None) -> np.ndarray:
    """A read-only copy of ``x`` (float64 unless ``dtype`` says otherwise for floats)."""
    arr = np.array(x, dtype=dtype, copy=True)
    if dtype is None and arr.dtype.kind == "f":
        arr = arr.astype(np.float64)
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------- ANN level

@dataclass(frozen=True, eq=False)
class AnnNode:
    """One operation. ``inputs`` name earlier nodes; ``origin`` is the module path or op
    it came from (used in error messages and reports)."""
    name: str
    inputs: tuple[str, ...]
    origin: str


@dataclass(frozen=True, eq=False)
class InputNode(AnnNode):
    """The model input: ``shape`` without batch, (C, H, W) or (F,). ``mean``/``std`` are a
    per-channel input affine transform ``(x - mean) / std`` recognised at the model's start
    (None when absent)."""
    shape: tuple[int, ...]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class ConvNode(AnnNode):
    """2-D convolution; ``weight`` (O, I/groups, kH, kW), ``bias`` (O,), BatchNorm folded."""
    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass(frozen=True, eq=False)
class LinearNode(AnnNode):
    """Fully connected; ``weight`` (O, I), ``bias`` (O,), BatchNorm folded."""
    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True, eq=False)
class ReluNode(AnnNode):
    """ReLU, or a clipped ReLU min(max(x, 0), clip) when ``clip`` is set (ReLU6, Hardtanh(0, a),
    clamp(0, a))."""
    clip: float | None = None


@dataclass(frozen=True, eq=False)
class QcfsNode(AnnNode):
    """The quantization-clip-floor-shift activation of QCFS-trained networks (Bu et al., ICLR
    2022), per channel c::

        y = threshold[c] / levels * clip(floor(x * levels / threshold[c] + 1/2), 0, levels)

    ``threshold`` (C,) is the learned one (one value per layer is broadcast to C). An IF
    neuron with that threshold and v[0] = threshold / 2 computes exactly this after
    T = ``levels`` steps, so conversion keeps it (no threshold search)."""
    threshold: np.ndarray
    levels: int


@dataclass(frozen=True, eq=False)
class AvgPoolNode(AnnNode):
    """Average pooling (count_include_pad semantics of torch's default, ceil_mode False)."""
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)


@dataclass(frozen=True, eq=False)
class FlattenNode(AnnNode):
    """Flatten (N, C, H, W) to (N, C*H*W) in C order."""


@dataclass(frozen=True, eq=False)
class AddNode(AnnNode):
    """Element-wise sum of its inputs (residual connection)."""


@dataclass(frozen=True, eq=False)
class SliceNode(AnnNode):
    """``x[start:stop:step]`` along axis ``dim`` of (N, C, H, W) or (N, F) (1 = channels or
    features, 2 = H, 3 = W; never the batch axis); 0 <= start < stop <= size, step >= 1.
    A layout op: exact and linear, folded into the synapses that read it."""
    dim: int
    start: int
    stop: int
    step: int = 1


@dataclass(frozen=True, eq=False)
class PadNode(AnnNode):
    """Zero padding: ``pads[i] = (before, after)`` for axis i + 1 (channels, H, W, or the
    features of a flat value); a negative amount crops, as ``F.pad`` does. Layout op."""
    pads: tuple[tuple[int, int], ...]


@dataclass(frozen=True, eq=False)
class ConcatNode(AnnNode):
    """Its inputs concatenated along axis ``dim`` (>= 1). Layout op: each input becomes its
    own synapses, embedded at its offset."""
    dim: int


@dataclass(frozen=True, eq=False)
class AnnGraph:
    """Nodes in topological order; the first is the ``InputNode``; ``output`` names the
    node whose value is the model output (logits)."""
    nodes: tuple[AnnNode, ...]
    output: str

    def node(self, name: str) -> AnnNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def input(self) -> InputNode:
        first = self.nodes[0]
        assert isinstance(first, InputNode)
        return first

    def consumers(self, name: str) -> tuple[AnnNode, ...]:
        return tuple(n for n in self.nodes if name in n.inputs)


# --------------------------------------------------------------------------- SNN level

@dataclass(frozen=True, eq=False)
class InputSpec:
    """The analog input: shape without batch and the optional per-channel affine transform
    ``(x - mean) / std`` applied before the first synapses."""
    shape: tuple[int, ...]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


class SynapseKind(StrEnum):
    """How a synapse's weight reads its source. A ``StrEnum``: its value is what the exported
    files store ("conv", "dense") and it compares equal to that string."""
    CONV = "conv"  # weight (O, I/groups, kH, kW) on the source's (C, H, W) output
    DENSE = "dense"  # weight (O, I) on the source's output flattened in C order


def _synapse_kind(syn: Any) -> None:
    """``__post_init__`` of the synapse classes: ``kind`` given as a string becomes the
    ``SynapseKind`` member (an unknown kind raises ``ValueError``)."""
    object.__setattr__(syn, "kind", SynapseKind(syn.kind))


@dataclass(frozen=True, eq=False)
class Synapse:
    """A linear map from population ``source`` (or ``INPUT``) into a layer's input current.

    ``kind == SynapseKind.CONV``: ``weight`` (O, I/groups, kH, kW) on the source's (C, H, W)
    output. ``kind == SynapseKind.DENSE``: ``weight`` (O, I) on the source's output flattened
    in C order. Pooling in front of a weighted layer is folded into its weight (exact, it is
    linear).
    """
    source: str
    kind: SynapseKind
    weight: np.ndarray
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    __post_init__ = _synapse_kind


@dataclass(frozen=True, eq=False)
class NeuronLayer:
    """A population of integrate-and-fire neurons (or the non-spiking readout).

    ``shape`` (C, H, W) or (F,); per-channel arrays have length C (or F). ``bias_schedule``
    is (T, C), added at step t (row t-1), or None before calibration. ``clip`` is the ANN
    activation's clip (None for plain ReLU). ``origin`` names the ANN activation (or Linear)
    it came from. ``signed``: the signed neuron (``sims.reference``), which also sends a -1
    spike, adding the threshold back, when its membrane is below 0 and its net spike count is
    positive (an opt-in departure from the paper's IF neuron; never on the readout).
    """
    name: str
    shape: tuple[int, ...]
    synapses: tuple[Synapse, ...]
    bias: np.ndarray
    threshold: np.ndarray
    v_init: np.ndarray
    bias_schedule: np.ndarray | None = None
    readout: bool = False
    clip: float | None = None
    origin: str = ""
    signed: bool = False

    @property
    def channels(self) -> int:
        return self.shape[0]


class _LayerChain:
    """``layer(name)`` and ``readout`` of a graph whose ``layers`` are in topological order
    with the readout last (SnnGraph, QuantGraph)."""
    layers: tuple[Any, ...]

    def layer(self, name: str) -> Any:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def readout(self) -> Any:
        return self.layers[-1]


@dataclass(frozen=True, eq=False)
class SnnGraph(_LayerChain):
    """Layers in topological order; the last one is the readout. ``meta`` records how the
    graph was made (threshold method, calibration summary, ...)."""
    input: InputSpec
    layers: tuple[NeuronLayer, ...]
    timesteps: int
    meta: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- integer level

@dataclass(frozen=True, eq=False)
class QInput:
    """Input encoding: graded spikes ``x_int = clip(round(x' * 2**scale_exp), lo, hi)`` of the
    transformed input x' = (x - mean) / std, sent at every step t = 1..T."""
    shape: tuple[int, ...]
    scale_exp: int
    mean: np.ndarray | None = None
    std: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class QSynapse:
    """Integer synapse: ``weight`` int32 effective values (as Lava's Dense holds them after
    its clip/truncate, i.e. even numbers in [-256, 254] for 8-bit mixed sign), applied as
    ``(sum w * s) << weight_exp`` (right shift for negative exponents)."""
    source: str
    kind: SynapseKind
    weight: np.ndarray
    weight_exp: int = 0
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    __post_init__ = _synapse_kind


@dataclass(frozen=True, eq=False)
class QLayer:
    """Integer neuron layer. ``vth`` (C,) int per-channel threshold in state units (one weight
    scale per output channel keeps every row's weights at full 8-bit resolution even when the
    float thresholds of a layer differ by orders of magnitude); ``bias_mant`` (T, C)
    int, effective bias ``bias_mant << bias_exp``; ``v_init`` (C,) int; ``depth`` is the
    number of synaptic hops from the input (= its step offset in Lava, where every hop
    delivers one step late; ``hw_targets.timing``; stored as "depth" in the exported files);
    ``scale`` (C,) float is state units per unit of the normalised float threshold (for
    reports and dequantization); ``signed``: the signed neuron (``sims.reference``)."""
    name: str
    shape: tuple[int, ...]
    synapses: tuple[QSynapse, ...]
    vth: np.ndarray
    bias_mant: np.ndarray
    bias_exp: int
    v_init: np.ndarray
    depth: int
    scale: np.ndarray
    readout: bool = False
    origin: str = ""
    signed: bool = False


@dataclass(frozen=True, eq=False)
class QuantGraph(_LayerChain):
    """The deployable integer network for ``target``. ``meta`` holds provenance (versions, T,
    alpha, seed, ...) and per-layer quantization statistics."""
    input: QInput
    layers: tuple[QLayer, ...]
    timesteps: int
    target: str
    meta: Mapping[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers

def evolve(obj: Any, **changes: Any) -> Any:
    """``dataclasses.replace`` that freezes any numpy array passed in ``changes``."""
    frozen = {k: frozen_array(v, v.dtype) if isinstance(v, np.ndarray) else v
              for k, v in changes.items()}
    return replace(obj, **frozen)


def graphs_equal(a: Any, b: Any) -> bool:
    """Structural equality of IR objects: same types, same fields, arrays equal in dtype,
    shape and value (NaN-free)."""
    if is_dataclass(a) and is_dataclass(b):
        return type(a) is type(b) and all(
            graphs_equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(a))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
                and a.dtype == b.dtype and a.shape == b.shape and bool(np.all(a == b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(graphs_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(graphs_equal(a[k], b[k]) for k in a)
    return a == b
