"""Random small networks for tests (shared: the Lava export tests import this too).

Public API
----------
``random_snn(seed, *, timesteps=4, conv=True, topology="chain", ...) -> SnnGraph``
    A normalised float SnnGraph (thresholds 1, FTBC-like bias schedules, v_init).
``random_qgraph(seed, *, timesteps=4, conv=True, topology="chain", stress=False, ...)``
    ``stress=False``: ``quantize(random_snn(...), loihi2)``; passes ``validate`` for
    topologies "chain" and "branch" (so Lava can run it). ``stress=True``: raw random
    integers (any weights, weight exponents -2..3, small thresholds, large biases, wide
    v_init, big fan-in) that saturate membranes and synaptic accumulators; for emulator vs
    reference tests only (it does NOT pass validate).
``random_inputs(seed, q_or_snn, n) -> np.ndarray``
    n float samples in [0, 1] of the graph's input shape.
``mnist_like_snn(seed, timesteps) -> SnnGraph``
    MnistNet shape (conv16-pool-conv32-pool-fc128-fc10, pools folded into the next
    layer's weights as the converter does) with random weights; for benchmarks.

Topologies: "chain" (conv -> conv -> dense -> readout), "branch" (two layers of equal
depth feed one layer: multi-source, delay-consistent), "skip" (a residual from depth 1 to
depth 3: validate() reports the delay mismatch).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.ir import (INPUT, InputSpec, NeuronLayer, QInput, QLayer, QSynapse,
                     QuantGraph, SnnGraph, Synapse, frozen_array)

TOPOLOGIES = ("chain", "branch", "skip")


@dataclass(frozen=True)
class _Layer:
    """Geometry of one layer: name, shape, synapses with float weights left to fill."""
    name: str
    shape: tuple[int, ...]
    synapses: tuple[Synapse, ...]
    readout: bool = False


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_syn(rng: np.random.Generator, source: str, src_shape: tuple[int, ...],
              out_c: int) -> tuple[Synapse, tuple[int, ...]]:
    """A random conv synapse (stride, padding, dilation, groups) and its output shape."""
    c, h, w = src_shape
    groups = int(rng.choice([g for g in (1, 2) if c % g == 0 and out_c % g == 0]))
    k, s, p, d = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(0, 2)), 1
    if k > 1 and rng.random() < 0.2:
        d = 2
    oh, ow = _conv_out(h, k, s, p, d), _conv_out(w, k, s, p, d)
    if oh < 1 or ow < 1:
        k, s, p, d = 1, 1, 0, 1
        oh, ow = h, w
    weight = rng.normal(0, 1, (out_c, c // groups, k, k))
    return (Synapse(source, "conv", weight, (s, s), (p, p), (d, d), groups),
            (out_c, oh, ow))


def _dense_syn(rng: np.random.Generator, source: str, src_shape: tuple[int, ...],
               out_f: int) -> Synapse:
    return Synapse(source, "dense", rng.normal(0, 1, (out_f, int(np.prod(src_shape)))))


def _geometry(rng: np.random.Generator, conv: bool, topology: str
              ) -> tuple[tuple[int, ...], list[_Layer]]:
    """Input shape and layers (float weights N(0, 1), rescaled later)."""
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}")
    if conv:
        in_shape = (int(rng.integers(1, 3)), int(rng.integers(4, 8)), int(rng.integers(4, 8)))
        s1, sh1 = _conv_syn(rng, INPUT, in_shape, 2 * int(rng.integers(1, 3)))
        s2, sh2 = _conv_syn(rng, "l1", sh1, 2 * int(rng.integers(1, 3)))
        l1, l2 = _Layer("l1", sh1, (s1,)), _Layer("l2", sh2, (s2,))
    else:
        in_shape = (int(rng.integers(3, 12)),)
        sh1, sh2 = (int(rng.integers(3, 9)),), (int(rng.integers(3, 9)),)
        l1 = _Layer("l1", sh1, (_dense_syn(rng, INPUT, in_shape, sh1[0]),))
        l2 = _Layer("l2", sh2, (_dense_syn(rng, "l1", sh1, sh2[0]),))
    layers = [l1, l2]
    hidden = int(rng.integers(3, 9))
    h_syn = [_dense_syn(rng, "l2", l2.shape, hidden)]
    if topology == "branch":
        n2 = int(rng.integers(3, 9))
        layers.append(_Layer("l2b", (n2,), (_dense_syn(rng, "l1", l1.shape, n2),)))
        h_syn.append(_dense_syn(rng, "l2b", (n2,), hidden))
    if topology == "skip":
        h_syn.append(_dense_syn(rng, "l1", l1.shape, hidden))
    layers.append(_Layer("l3", (hidden,), tuple(h_syn)))
    classes = int(rng.integers(2, 6))
    layers.append(_Layer("out", (classes,), (_dense_syn(rng, "l3", (hidden,), classes),),
                         readout=True))
    return in_shape, layers


def _fan_in(syn: Synapse) -> int:
    return int(np.prod(syn.weight.shape[1:]))


def _float_layer(rng: np.random.Generator, g: _Layer, timesteps: int, gain: float,
                 schedule: bool) -> NeuronLayer:
    """Normalised float parameters: weights ~ gain / sqrt(fan-in), small mixed biases."""
    c = g.shape[0]
    syns = tuple(Synapse(s.source, s.kind, s.weight * gain / np.sqrt(_fan_in(s) * len(g.synapses)),
                         s.stride, s.padding, s.dilation, s.groups) for s in g.synapses)
    sched = rng.normal(0, 0.05, (timesteps, c)) if schedule else None
    v_init = np.zeros(c) if g.readout else rng.uniform(0, 0.9, c)
    return NeuronLayer(name=g.name, shape=g.shape, synapses=syns,
                       bias=frozen_array(rng.normal(0, 0.1, c)),
                       threshold=frozen_array(np.ones(c)), v_init=frozen_array(v_init),
                       bias_schedule=None if sched is None else frozen_array(sched),
                       readout=g.readout, origin=f"random.{g.name}")


def random_snn(seed: int, *, timesteps: int = 4, conv: bool = True, topology: str = "chain",
               gain: float = 1.5, schedule: bool = True, input_norm: bool = True) -> SnnGraph:
    """A small random normalised SnnGraph (see module docstring)."""
    rng = np.random.default_rng(seed)
    in_shape, geometry = _geometry(rng, conv, topology)
    mean = std = None
    if input_norm:
        mean = frozen_array(rng.uniform(0.1, 0.6, in_shape[0]))
        std = frozen_array(rng.uniform(0.2, 0.5, in_shape[0]))
    layers = tuple(_float_layer(rng, g, timesteps, gain, schedule) for g in geometry)
    return SnnGraph(input=InputSpec(in_shape, mean, std), layers=layers,
                    timesteps=timesteps, meta={"builder": "random_snn", "seed": seed})


def _stress_synapse(rng: np.random.Generator, s: Synapse, big: bool) -> QSynapse:
    """Raw integer weights of any parity, exponent -2..3, sometimes huge."""
    hi = 1 << int(rng.integers(9, 16)) if big else 256
    w = rng.integers(-hi, hi, s.weight.shape) * (rng.random(s.weight.shape) < 0.7)
    w = np.abs(w) if rng.random() < 0.3 else w  # one sign: accumulators can clamp
    return QSynapse(s.source, s.kind, frozen_array(w, np.int32), int(rng.integers(-2, 4)),
                    s.stride, s.padding, s.dilation, s.groups)


def _stress_layer(rng: np.random.Generator, g: _Layer, timesteps: int,
                  delays: dict[str, int]) -> QLayer:
    """Raw integer layer: small vth, 13-bit biases with any exponent, wide v_init."""
    c, big = g.shape[0], bool(rng.random() < 0.3)
    top = 1 << int(rng.integers(4, 18))
    vth = np.zeros(c, np.int64) if g.readout else rng.integers(max(1, top // 2), top + 1, c)
    v_init = rng.integers(-(1 << 22), np.maximum(vth, 1))
    delays[g.name] = 1 + max(delays[s.source] for s in g.synapses)
    return QLayer(name=g.name, shape=g.shape,
                  synapses=tuple(_stress_synapse(rng, s, big) for s in g.synapses),
                  vth=frozen_array(vth, np.int64),
                  bias_mant=frozen_array(rng.integers(-4096, 4096, (timesteps, c)), np.int64),
                  bias_exp=int(rng.integers(0, 8)), v_init=frozen_array(v_init, np.int64),
                  depth=delays[g.name], scale=frozen_array(np.maximum(vth, 1), np.float64),
                  readout=g.readout)


def random_qgraph(seed: int, *, timesteps: int = 4, conv: bool = True, topology: str = "chain",
                  stress: bool = False, target: str = "loihi2") -> QuantGraph:
    """A small random QuantGraph (see module docstring)."""
    if not stress:
        from exporters.quantize import quantize
        from hw_targets import get_target
        snn = random_snn(seed, timesteps=timesteps, conv=conv, topology=topology)
        return quantize(snn, get_target(target))
    rng = np.random.default_rng(seed)
    in_shape, geometry = _geometry(rng, conv, topology)
    delays = {INPUT: 0}
    layers = tuple(_stress_layer(rng, g, timesteps, delays) for g in geometry)
    qin = QInput(in_shape, int(rng.integers(-1, 8)), frozen_array(rng.uniform(0, 0.5, in_shape[0])),
                 frozen_array(rng.uniform(0.1, 1.0, in_shape[0])))
    return QuantGraph(input=qin, layers=layers, timesteps=timesteps, target=target,
                      meta={"builder": "random_qgraph(stress)", "seed": seed})


def accumulation_bound_readout(seed: int, target: str = "loihi2"
                               ) -> tuple[QuantGraph, QuantGraph, float]:
    """(plain, shifted, bound): ``random_snn(seed, timesteps=5)`` quantized as is, and with a
    readout bound 2**12 times its provable one, so that the readout's 24-bit accumulation, not
    its weights, sets its scale (what large T does to a real network's readout)."""
    from exporters.quantize import quantize
    from hw_targets import get_target
    snn, hw = random_snn(seed, timesteps=5), get_target(target)
    plain = quantize(snn, hw)
    bound = plain.meta["quantization"][plain.readout.name]["readout_bound"] * 2.0 ** 12
    return plain, quantize(snn, hw, readout_bound=bound), bound


def random_inputs(seed: int, graph: SnnGraph | QuantGraph, n: int) -> np.ndarray:
    """n samples uniform in [0, 1] with the graph's input shape."""
    rng = np.random.default_rng(seed)
    return rng.random((n, *graph.input.shape))


# --------------------------------------------------------------------------- MnistNet shape

def fold_avgpool_conv(weight: np.ndarray) -> np.ndarray:
    """Kernel of conv(avgpool2(x)) as one stride-2 conv on x: each tap spread over 2x2/4.
    A k x k kernel with padding p becomes 2k x 2k with stride 2 and padding 2p."""
    return np.repeat(np.repeat(weight, 2, axis=2), 2, axis=3) / 4.0


def fold_avgpool_dense(weight: np.ndarray, pooled_shape: tuple[int, int, int]) -> np.ndarray:
    """Dense weight on avgpool2(x) flattened -> dense weight on x (C, 2H, 2W) flattened."""
    w = weight.reshape(weight.shape[0], *pooled_shape)
    return (np.repeat(np.repeat(w, 2, axis=2), 2, axis=3) / 4.0).reshape(weight.shape[0], -1)


def mnist_like_snn(seed: int = 0, timesteps: int = 32) -> SnnGraph:
    """MnistNet-shaped normalised SnnGraph with random weights (firing ~5-20 %)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int, gain: float = 2.0) -> np.ndarray:
        return rng.normal(0, gain / np.sqrt(np.prod(shape[1:])), shape)

    def layer(name: str, shape: tuple[int, ...], syn: Synapse, readout: bool = False):
        c = shape[0]
        return NeuronLayer(name, shape, (syn,), frozen_array(rng.normal(0, 0.05, c)),
                           frozen_array(np.ones(c)), frozen_array(np.full(c, 0 if readout else 0.5)),
                           frozen_array(rng.normal(0, 0.02, (timesteps, c))), readout)

    layers = (
        layer("conv1", (16, 28, 28), Synapse(INPUT, "conv", w(16, 1, 3, 3, gain=0.3), padding=(1, 1))),
        layer("conv2", (32, 14, 14), Synapse("conv1", "conv", fold_avgpool_conv(w(32, 16, 3, 3)),
                                             stride=(2, 2), padding=(2, 2))),
        layer("fc1", (128,), Synapse("conv2", "dense",
                                     fold_avgpool_dense(w(128, 32 * 7 * 7), (32, 7, 7)))),
        layer("fc2", (10,), Synapse("fc1", "dense", w(10, 128)), readout=True),
    )
    spec = InputSpec((1, 28, 28), frozen_array([0.1307]), frozen_array([0.3081]))
    return SnnGraph(spec, layers, timesteps, {"builder": "mnist_like_snn", "seed": seed})
