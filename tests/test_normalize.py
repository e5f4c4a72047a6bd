"""Normalisation to unit thresholds is spike-exact in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.ir import evolve
from sims.torch_snn import simulate
from tests.ann_builders import graph_from_sequential, residual_graph, small_cnn
from toolchain.convert import convert
from toolchain.normalize import normalize

torch.set_num_threads(1)
RNG = np.random.default_rng(5)
X = RNG.random((96, 1, 8, 8))


def _with_random_schedules(snn, seed):
    g = np.random.default_rng(seed)
    return evolve(snn, layers=tuple(
        evolve(l, bias_schedule=g.normal(0, 0.1, (snn.timesteps, l.channels)))
        for l in snn.layers))


def _graphs():
    for seed in range(3):
        torch.manual_seed(seed)
        yield graph_from_sequential(small_cnn().eval(), (1, 8, 8), mean=[0.2], std=[0.3])
        yield residual_graph(seed)


@pytest.mark.parametrize("index", range(6))
def test_spike_trains_identical_in_float64(index):
    ann = list(_graphs())[index]
    snn = _with_random_schedules(convert(ann, X[:48], timesteps=6), index)
    norm = normalize(snn)
    for layer in norm.layers:
        expected = 1.0 if not layer.readout else snn.readout.threshold
        np.testing.assert_array_equal(layer.threshold, expected)
    a = simulate(snn, X, record_spikes=True, dtype=torch.float64)
    b = simulate(norm, X, record_spikes=True, dtype=torch.float64)
    assert sum(a.spike_counts.values()) > 0
    for name in a.spikes:
        np.testing.assert_array_equal(a.spikes[name], b.spikes[name])
    np.testing.assert_array_equal(a.predictions, b.predictions)


def test_weights_scaled_by_source_and_target_thresholds():
    torch.manual_seed(0)
    snn = convert(graph_from_sequential(small_cnn().eval(), (1, 8, 8)), X, timesteps=4)
    norm = normalize(snn)
    src, dst = snn.layer("relu4"), snn.layer("relu8")
    w, w_n = dst.synapses[0].weight, norm.layer("relu8").synapses[0].weight
    o, i = 3, 37  # dense column 37 of a (16, 4, 4) source = channel 37 // 16 = 2
    assert np.isclose(w_n[o, i], w[o, i] * src.threshold[2] / dst.threshold[o])
    np.testing.assert_allclose(norm.layer("relu8").bias, dst.bias / dst.threshold)
    np.testing.assert_array_equal(norm.layer("relu8").v_init, dst.v_init)
    ro = norm.readout.synapses[0].weight
    np.testing.assert_allclose(ro, snn.readout.synapses[0].weight * dst.threshold[None, :])
    np.testing.assert_array_equal(norm.readout.bias, snn.readout.bias)
    assert norm.meta["normalized"] is True
