"""Conversion: exact folding of pools/flatten/residuals, thresholds, errors, meta."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from core.errors import InputError, UnsupportedModelError
from core.ir import (INPUT, AnnGraph, AvgPoolNode, ConvNode, FlattenNode, InputNode,
                     LinearNode, QcfsNode, ReluNode, frozen_array)
from sims.torch_snn import synapse_current
from tests.ann_builders import graph_from_sequential, residual_graph, small_cnn
from tests.threshold_reference import grid_search_mse
from toolchain.ann import ann_forward
from toolchain.convert import convert, threshold_mse

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
X = RNG.random((64, 1, 8, 8))


def _pre_activation_check(ann: AnnGraph, snn, x: np.ndarray) -> None:
    """Each layer's synapse currents + bias, fed the ANN's own activations, equal the ANN's
    pre-activation exactly (float64)."""
    _, values = ann_forward(ann, x, record=True, dtype=torch.float64)
    for layer in snn.layers:
        node = ann.node(layer.name)
        z = values[node.name] if layer.readout else values[node.inputs[0]]
        total = torch.zeros_like(z)
        for syn in layer.synapses:
            src = values[ann.input.name] if syn.source == INPUT else values[syn.source]
            total = total + synapse_current(syn, src)
        chan = (1, -1) + (1,) * (z.dim() - 2)
        total = total + torch.tensor(layer.bias).reshape(chan)
        np.testing.assert_allclose(total.numpy(), z.numpy(), rtol=1e-10, atol=1e-10)


def _seeded_cnn(seed=0):
    torch.manual_seed(seed)
    return graph_from_sequential(small_cnn().eval(), (1, 8, 8), mean=[0.3], std=[0.4])


def test_pool_folding_is_exact():
    ann = _seeded_cnn()
    snn = convert(ann, X, timesteps=8)
    assert [l.name for l in snn.layers] == ["relu1", "relu4", "relu8", "linear9"]
    conv2 = snn.layer("relu4").synapses[0]
    assert conv2.kind == "conv" and conv2.weight.shape == (16, 8, 6, 6)  # pool2 + conv3x3
    assert conv2.stride == (2, 2) and conv2.padding == (2, 2)
    assert snn.layer("relu8").synapses[0].kind == "dense"  # pool -> flatten -> linear
    assert snn.readout.readout and snn.readout.name == "linear9"
    assert snn.input.mean.tolist() == [0.3] and snn.input.std.tolist() == [0.4]
    _pre_activation_check(ann, snn, X[:8])


def test_residual_identity_and_pool_shortcuts_are_exact():
    ann = residual_graph(3)
    snn = convert(ann, X, timesteps=4)
    r3, r4 = snn.layer("r3"), snn.layer("r4")
    ident = [s for s in r3.synapses if s.source == "r1"][0]
    np.testing.assert_array_equal(ident.weight[:, :, 0, 0], np.eye(4))
    pool = [s for s in r4.synapses if s.weight.shape[2:] == (2, 2)][0]
    assert pool.source == "r3" and pool.stride == (2, 2)
    np.testing.assert_allclose(pool.weight[1, 1], np.full((2, 2), 0.25))
    assert pool.weight[0, 1].sum() == 0
    _pre_activation_check(ann, snn, X[:8])


def test_grouped_conv_after_pool_folds_exactly():
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64, 3))
    torch.manual_seed(1)
    ann = graph_from_sequential(seq.eval(), (1, 8, 8))
    snn = convert(ann, X, timesteps=4)
    assert snn.layer("relu6").synapses[0].groups == 4  # depthwise stays depthwise
    _pre_activation_check(ann, snn, X[:4])


def _conv(name, src, cin, cout, padding=1, bias=0.0):
    w = RNG.normal(0, 0.3, (cout, cin, 3, 3))
    return ConvNode(name, (src,), f"model.{name}", frozen_array(w),
                    frozen_array(np.full(cout, bias)), padding=(padding, padding))


def test_unsupported_constructs_are_collected_and_named():
    nodes = (InputNode("x", (), "input", (1, 8, 8)), _conv("c1", "x", 1, 2),
             _conv("c2", "c1", 2, 2), ReluNode("r1", ("c2",), "model.act1"),
             _conv("c3", "r1", 2, 2, bias=0.5),
             AvgPoolNode("p", ("c3",), "model.pool", (3, 3), (1, 1), (1, 1)),
             ReluNode("r2", ("p",), "model.act2"),
             LinearNode("fc", ("r2",), "model.fc", frozen_array(np.ones((3, 8))),
                        frozen_array(np.zeros(3))))
    with pytest.raises(UnsupportedModelError) as err:
        convert(AnnGraph(nodes, "fc"), X, timesteps=4)
    text = str(err.value)
    assert "model.c1" in text and "model.c2" in text and "without an activation" in text
    assert "model.pool" in text or "model.act2" in text
    assert "readout must be flat" in text
    assert len(err.value.problems) >= 3


def test_threshold_methods():
    ann = _seeded_cnn(2)
    _, values = ann_forward(ann, X, record=True)
    act = values["relu1"].transpose(0, 1).reshape(8, -1)
    mx = convert(ann, X, timesteps=4, threshold="max").layer("relu1").threshold
    np.testing.assert_allclose(mx, act.max(1).values.double().numpy(), rtol=1e-6)
    p100 = convert(ann, X, timesteps=4, threshold="percentile", percentile=100.0)
    np.testing.assert_allclose(p100.layer("relu1").threshold, mx, rtol=1e-6)
    p90 = convert(ann, X, timesteps=4, threshold="percentile", percentile=90.0)
    assert np.all(p90.layer("relu1").threshold <= mx + 1e-9)
    m1 = convert(ann, X, timesteps=1, threshold="mse").layer("relu1").threshold
    m32 = convert(ann, X, timesteps=32, threshold="mse").layer("relu1").threshold
    assert np.all(m1 <= mx + 1e-9) and np.all(m32 <= mx + 1e-9)
    assert not np.allclose(m1, m32)  # thresholds depend on T
    assert np.all(m1 > 0)


def test_threshold_scale_multiplies_searched_thresholds_only():
    """``threshold_scale`` multiplies every searched threshold (v0 = v_init * theta and the
    spike payload follow from theta); a clip, a QCFS layer's learned thresholds and the
    readout's keep theirs; a scale that is not finite and > 0 is an InputError."""
    torch.manual_seed(5)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU6(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(8),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    nodes = {n.name: n for n in graph_from_sequential(seq, (1, 8, 8)).nodes}
    nodes["relu5"] = QcfsNode("relu5", ("conv4",), "relu5",  # a learned QCFS threshold
                              frozen_array([0.5, 1.0, 1.5, 2.0]), 4)
    ann = AnnGraph(tuple(nodes.values()), "linear8")
    plain = convert(ann, X, timesteps=2)
    scaled = convert(ann, X, timesteps=2, threshold_scale=1.25)
    assert scaled.meta["threshold_scale"] == 1.25 and plain.meta["threshold_scale"] == 1.0
    searched, clipped, learned = plain.layers[:3]
    assert (searched.name, clipped.name, learned.name) == ("relu1", "relu63", "relu5")
    assert clipped.clip == 6.0
    np.testing.assert_allclose(scaled.layer("relu1").threshold, 1.25 * searched.threshold,
                               rtol=1e-12)
    for kept in (clipped, learned, plain.readout):
        np.testing.assert_array_equal(scaled.layer(kept.name).threshold, kept.threshold)
    np.testing.assert_array_equal(learned.threshold, [0.5, 1.0, 1.5, 2.0])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InputError, match="threshold_scale"):
            convert(ann, X, timesteps=2, threshold_scale=bad)


def test_mse_threshold_minimises_quantisation_error():
    vals = torch.tensor(np.random.default_rng(3).exponential(1.0, (2, 5000)))
    theta = threshold_mse(vals, 4, 0.5)

    def err(th):
        q = torch.clamp(torch.floor(vals * 4 / th + 0.5), 0, 4) * th / 4
        return ((vals - q) ** 2).sum(1)
    vmax = vals.max(1).values
    for frac in (1.0, 0.8, 0.5, 0.3):
        assert torch.all(err(theta[:, None]) <= err((vmax * frac)[:, None]) + 1e-12)


def test_silent_channel_gets_fallback_and_clip_is_threshold():
    w = np.zeros((2, 1, 3, 3))
    w[1] = 0.2
    nodes = (InputNode("x", (), "input", (1, 8, 8)),
             ConvNode("c", ("x",), "c", frozen_array(w), frozen_array([-1.0, 0.1]),
                      padding=(1, 1)),
             ReluNode("r", ("c",), "r"),
             _conv("c2", "r", 2, 3),
             ReluNode("r6", ("c2",), "r6", clip=6.0),
             AvgPoolNode("p", ("r6",), "p", (8, 8), (8, 8)),
             FlattenNode("f", ("p",), "f"),
             LinearNode("fc", ("f",), "fc", frozen_array(np.ones((2, 3))),
                        frozen_array(np.zeros(2))))
    snn = convert(AnnGraph(nodes, "fc"), X, timesteps=4, threshold="max")
    r = snn.layer("r")
    assert snn.meta["fallback_channels"] == {"r": [0]}
    assert r.threshold[0] == r.threshold[1] > 0
    np.testing.assert_array_equal(snn.layer("r6").threshold, [6.0, 6.0, 6.0])
    assert snn.layer("r6").clip == 6.0


def test_meta_options_and_encoding_choices():
    ann = _seeded_cnn(4)
    snn = convert(ann, X, timesteps=8, threshold="percentile", percentile=99.5, v_init=0.25,
                  input_shift=True)
    meta = snn.meta
    assert (meta["threshold_method"], meta["percentile"], meta["timesteps"]) == \
        ("percentile", 99.5, 8)
    assert meta["v_init"] == 0.25 and meta["input_shift"] is True
    plain = convert(ann, X, timesteps=8, threshold="percentile", percentile=99.5,
                    v_init=0.25)
    layer, base = snn.layer("relu1"), plain.layer("relu1")
    np.testing.assert_allclose(layer.bias - base.bias, layer.threshold / 16)
    np.testing.assert_array_equal(layer.v_init, np.full(8, 0.25))
    assert snn.readout.v_init.sum() == 0 and np.all(snn.readout.threshold == 1)
    with pytest.raises(InputError):
        convert(ann, X, timesteps=0)
    with pytest.raises(InputError):
        convert(ann, X, timesteps=4, threshold="bogus")


@pytest.mark.parametrize("timesteps,offset", [(1, 0.0), (4, 0.5), (16, 0.0), (32, 0.5)])
def test_sorted_mse_search_equals_brute_force(timesteps, offset):
    from toolchain.convert import threshold_mse
    gen = torch.Generator().manual_seed(timesteps)
    values = torch.relu(torch.randn(6, 3000, generator=gen, dtype=torch.float64))
    values = values * torch.rand(6, 1, generator=gen, dtype=torch.float64)
    values[2] = 0.0  # a silent channel
    got = threshold_mse(values, timesteps, offset)
    assert torch.equal(got, grid_search_mse(values, timesteps, offset))


@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_blocked_threshold_search_changes_no_threshold(monkeypatch, method):
    """The search runs over blocks of channels to bound its float64 workspace; with blocks
    of one channel (and of a few) every threshold is bit-identical to one block per layer."""
    import toolchain.convert as conv
    ann = _seeded_cnn(3)
    whole = convert(ann, X, timesteps=4, threshold=method, percentile=99.0)
    # 1: one channel per block; 3 x 4,096: relu1 (8 channels of 64 samples x 64 values) in
    # blocks of 3, 3, 2, relu4 (16 of 1,024) in blocks of 12 and 4, relu8 in one block
    for block in (1, 3 * 64 * 64):
        monkeypatch.setattr(conv, "SEARCH_BLOCK_VALUES", block)
        blocked = convert(ann, X, timesteps=4, threshold=method, percentile=99.0)
        for a, b in zip(whole.layers, blocked.layers):
            assert np.array_equal(a.threshold, b.threshold), (method, block, a.name)
    assert len({float(t) for t in whole.layer("relu1").threshold}) > 1  # per-channel values
