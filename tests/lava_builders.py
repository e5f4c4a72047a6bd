"""Small hand-built QuantGraphs for the netx and Lava tests.

Weights are even integers in [-256, 254] (Lava Dense's 8-bit mixed-sign values), biases and
v_init include negative values, the first synapse carries graded 8-bit input. Scales are chosen
so that layers spike a fair amount (neither silent nor saturated) on random inputs.
"""
from __future__ import annotations

import numpy as np

from core.ir import INPUT, QInput, QLayer, QSynapse, QuantGraph, evolve, frozen_array


def even_weights(rng: np.random.Generator, shape: tuple[int, ...], amp: int,
                 bias: int = 0) -> np.ndarray:
    """Even int32 weights, uniform in about [bias - amp, bias + amp], clipped to Lava's range."""
    w = 2 * rng.integers(-amp // 2, amp // 2 + 1, size=shape) + 2 * (bias // 2)
    return frozen_array(np.clip(w, -256, 254), np.int32)


def layer(rng: np.random.Generator, name: str, shape: tuple[int, ...],
          synapses: tuple[QSynapse, ...], steps: int, depth: int, vth: int,
          readout: bool = False, bias_amp: int = 40, bias_exp: int = 6) -> QLayer:
    """A QLayer with per-channel thresholds in [vth, 1.5 vth) (the readout's stay 0), a
    random (T, C) bias schedule and random v_init (both signs)."""
    chans = shape[0]
    vths = np.full(chans, vth) if readout else vth + rng.integers(0, vth // 2 + 1, size=chans)
    return QLayer(name=name, shape=shape, synapses=synapses,
                  vth=frozen_array(vths, np.int64),
                  bias_mant=frozen_array(rng.integers(-bias_amp, bias_amp + 1,
                                                      size=(steps, chans)), np.int32),
                  bias_exp=bias_exp,
                  v_init=frozen_array(rng.integers(-vth // 2, vth // 2 + 1, size=chans),
                                      np.int32),
                  depth=depth, scale=frozen_array(np.maximum(vths, 1), np.float64),
                  readout=readout, origin=f"test.{name}")


def dense(source: str, weight: np.ndarray, weight_exp: int = 0) -> QSynapse:
    return QSynapse(source=source, kind="dense", weight=weight, weight_exp=weight_exp)


def conv(source: str, weight: np.ndarray, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
         groups: int = 1) -> QSynapse:
    return QSynapse(source=source, kind="conv", weight=weight, stride=stride,
                    padding=padding, dilation=dilation, groups=groups)


def meta(seed: int) -> dict:
    return {"versions": {"ftbc": "0.1.0", "numpy": np.__version__}, "T": 0, "alpha": 0.3,
            "seed": seed, "scales": np.array([1.5, 2.25]),
            "stats": {"clip_frac": [0.0, 0.01], "hist": np.arange(6, dtype=np.int64)},
            "note": None, "flag": True}


def dense_chain(seed: int = 0, sizes: tuple[int, ...] = (12, 16, 10, 5),
                steps: int = 6) -> QuantGraph:
    """input (F,) -> dense IF -> ... -> dense readout; depth len(sizes) - 1."""
    rng = np.random.default_rng(seed)
    layers, prev = [], INPUT
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        name, last = f"fc{i + 1}", i == len(sizes) - 2
        first = prev == INPUT
        syn = dense(prev, even_weights(rng, (n_out, n_in), 12 if first else 120,
                                       bias=0 if first else 8))
        layers.append(layer(rng, name, (n_out,), (syn,), steps, depth=i + 1,
                            vth=64 * (1200 if first else 200), readout=last))
        prev = name
    m = meta(seed)
    m["T"] = steps
    return QuantGraph(input=QInput(shape=(sizes[0],), scale_exp=6), layers=tuple(layers),
                      timesteps=steps, target="loihi2-sim", meta=m)


def conv_net(seed: int = 0, steps: int = 5) -> QuantGraph:
    """input (2, 6, 6) -> conv 3x3 pad 1 (4 ch) -> conv 3x3 stride 2 groups 2 (4 ch)
    -> conv 2x2 dilation... -> dense readout (3). Normalised input (mean/std)."""
    rng = np.random.default_rng(seed)
    c1 = conv(INPUT, even_weights(rng, (4, 2, 3, 3), 10), padding=(1, 1))
    l1 = layer(rng, "conv1", (4, 6, 6), (c1,), steps, 1, vth=64 * 500)
    c2 = conv("conv1", even_weights(rng, (4, 2, 3, 3), 120, bias=4), stride=(2, 1),
              padding=(1, 0), groups=2)
    l2 = layer(rng, "conv2", (4, 3, 4), (c2,), steps, 2, vth=64 * 200)
    c3 = conv("conv2", even_weights(rng, (6, 4, 2, 2), 120, bias=4), dilation=(1, 2))
    l3 = layer(rng, "conv3", (6, 2, 2), (c3,), steps, 3, vth=64 * 200)
    fc = dense("conv3", even_weights(rng, (3, 24), 120))
    out = layer(rng, "out", (3,), (fc,), steps, 4, vth=64 * 100, readout=True)
    qin = QInput(shape=(2, 6, 6), scale_exp=5, mean=frozen_array([0.5, 0.25]),
                 std=frozen_array([0.5, 0.25]))
    m = meta(seed)
    m["T"] = steps
    return QuantGraph(input=qin, layers=(l1, l2, l3, out), timesteps=steps,
                      target="loihi2-sim", meta=m)


def residual_net(seed: int = 0, steps: int = 4, same_depth: bool = True) -> QuantGraph:
    """A layer fed by two synapses (a residual-style sum). ``same_depth``: both sources are one
    hop from the input, so Lava delivers them together; otherwise the sum skips over a layer
    (sources at depths 2 and 1): the synapse from the shallower one has a synaptic delay of
    1 step (a DelaySparse in Lava)."""
    rng = np.random.default_rng(seed)
    a = layer(rng, "a", (8,), (dense(INPUT, even_weights(rng, (8, 6), 12)),), steps, 1,
              vth=64 * 800)
    b_src, b_n = (INPUT, 6) if same_depth else ("a", 8)
    b = layer(rng, "b", (8,), (dense(b_src, even_weights(rng, (8, b_n), 12 if same_depth
                                                         else 120)),),
              steps, 1 if same_depth else 2, vth=64 * (800 if same_depth else 200))
    depth = b.depth + 1
    c = layer(rng, "c", (5,), (dense("a", even_weights(rng, (5, 8), 120, 20)),
                               dense("b", even_weights(rng, (5, 8), 120, 20))),
              steps, depth, vth=64 * 100)
    out = layer(rng, "out", (3,), (dense("c", even_weights(rng, (3, 5), 120)),), steps,
                depth + 1, vth=64 * 100, readout=True)
    return QuantGraph(input=QInput(shape=(6,), scale_exp=6), layers=(a, b, c, out),
                      timesteps=steps, target="loihi2-sim", meta=meta(seed))


def random_inputs(q: QuantGraph, num: int, seed: int = 1) -> np.ndarray:
    """Float samples in [0, 1) of the graph's input shape."""
    return np.random.default_rng(seed).random((num,) + tuple(q.input.shape))


def edge_chain(seed: int = 0, steps: int = 5) -> QuantGraph:
    """Corners of the arithmetic: a negative weight_exp (floor shift) on the graded input, a
    positive weight_exp, all-negative weight matrices holding -256 (the sign mode must stay
    MIXED), and a readout (vth 0, as the quantizer writes it) whose bias (the largest
    mantissa and exponent the target allows) drives v, started near the rails, into the
    24-bit saturation at both ends in channels 0 and 1 from the first step on."""
    rng = np.random.default_rng(seed)
    l1 = layer(rng, "fc1", (10,), (dense(INPUT, even_weights(rng, (10, 6), 30), -1),),
               steps, 1, vth=64 * 400)
    l2 = layer(rng, "fc2", (8,), (dense("fc1", even_weights(rng, (8, 10), 60, 6), 1),),
               steps, 2, vth=64 * 300)
    neg = -np.abs(np.asarray(even_weights(rng, (6, 8), 200)))
    neg[:, 0] = -256     # Lava's inferred INHIBITORY mode would clip this to -255
    l3 = layer(rng, "fc3", (6,), (dense("fc2", frozen_array(neg, np.int32)),), steps, 3,
               vth=64 * 50, bias_amp=120)
    neg_out = -np.abs(np.asarray(even_weights(rng, (4, 8), 120)))
    neg_out[:, 0] = -256  # visible in the readout if Lava clipped it
    out = layer(rng, "out", (4,), (dense("fc2", frozen_array(neg_out, np.int32)),), steps, 3,
                vth=0, readout=True, bias_exp=7)
    bias, v_init = np.array(out.bias_mant, dtype=np.int32), np.array(out.v_init, np.int32)
    bias[:, 0], bias[:, 1] = 4095, -4096
    v_init[0], v_init[1] = (1 << 23) - 1 - 100_000, -(1 << 23) + 100_000
    out = evolve(out, bias_mant=bias, v_init=v_init)
    return QuantGraph(input=QInput(shape=(6,), scale_exp=6), layers=(l1, l2, l3, out),
                      timesteps=steps, target="loihi2-sim", meta=meta(seed))


def threshold_net(steps: int = 4) -> QuantGraph:
    """v lands exactly on vth: with x_int = 50 and weight 2, v grows 6400 per step and reaches
    vth = 12800 at t = 2, where ``>=`` spikes and Lava LIF's ``>`` would not."""
    zero = frozen_array(np.zeros((steps, 2)), np.int32)
    l1 = QLayer(name="fc1", shape=(2,),
                synapses=(dense(INPUT, frozen_array([[2, 0], [0, 2]], np.int32)),),
                vth=frozen_array([12800, 12800], np.int64), bias_mant=zero, bias_exp=0,
                v_init=frozen_array([0, 0], np.int32), depth=1,
                scale=frozen_array([1.0, 1.0]))
    out = QLayer(name="out", shape=(2,),
                 synapses=(dense("fc1", frozen_array([[2, 0], [0, 2]], np.int32)),),
                 vth=frozen_array([0, 0], np.int64), bias_mant=zero, bias_exp=0, v_init=frozen_array([0, 0], np.int32),
                 depth=2, scale=frozen_array([1.0, 1.0]), readout=True)
    return QuantGraph(input=QInput(shape=(2,), scale_exp=0), layers=(l1, out),
                      timesteps=steps, target="loihi2-sim", meta={})
