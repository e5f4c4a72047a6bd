"""sims.emulator must equal sims.reference exactly (assert_array_equal, never allclose)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InputError
from core.ir import (INPUT, InputSpec, NeuronLayer, QInput, QLayer, QSynapse,
                     QuantGraph, SnnGraph, Synapse, frozen_array)
from exporters.quantize import quantize
from hw_targets import get_target
from sims import engine
from sims.emulator import emulate
from sims.reference import encode_input, reference_run
from tests.qgraph_builders import (fold_avgpool_conv, fold_avgpool_dense, random_inputs,
                                   random_qgraph)


def assert_matches_reference(q: QuantGraph, x: np.ndarray, **kwargs) -> None:
    """Every spike and every readout value of every sample equals the reference."""
    res = emulate(q, x, record=True, **kwargs)
    x_int = encode_input(q.input, x)
    for i in range(len(x)):
        ref = reference_run(q, x_int[i])
        for layer in q.layers:
            if layer.readout:
                np.testing.assert_array_equal(res.readout_trace[i], ref[layer.name])
            else:
                np.testing.assert_array_equal(res.spikes[layer.name][:, i], ref[layer.name])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), conv=st.booleans(),
       topology=st.sampled_from(["chain", "branch", "skip"]), stress=st.booleans(),
       steps=st.integers(1, 6), n=st.integers(1, 4), batch=st.integers(1, 3))
def test_emulator_equals_reference(seed, conv, topology, stress, steps, n, batch):
    q = random_qgraph(seed, timesteps=steps, conv=conv, topology=topology, stress=stress)
    assert_matches_reference(q, random_inputs(seed, q, n), batch_size=batch)


def test_inputs_outside_unit_range_clip_like_reference():
    q = random_qgraph(4, stress=True)
    x = np.random.default_rng(0).normal(0, 3, (3, *q.input.shape))
    assert_matches_reference(q, x)


def _single_layer(weight: np.ndarray, bias_mant: int, steps: int) -> QuantGraph:
    """Input -> dense readout with a constant bias."""
    k, f = weight.shape
    layer = QLayer("out", (k,), (QSynapse(INPUT, "dense", frozen_array(weight, np.int32)),), 0,
                   frozen_array(np.full((steps, k), bias_mant), np.int64), 7,
                   frozen_array(np.zeros(k), np.int64), 1, 1.0, readout=True)
    return QuantGraph(QInput((f,), 7), (layer,), steps, "loihi2")


def test_membrane_saturation_is_counted():
    q = _single_layer(np.zeros((3, 2)), 4095, 20)  # +524160 per step: clamps from t = 17
    res = emulate(q, np.zeros((5, 2)))
    assert res.saturations["out"] == 4 * 3 * 5
    assert res.readout.max() == (1 << 23) - 1
    assert_matches_reference(q, np.zeros((5, 2)))


def test_synaptic_clamp_is_counted_and_exact():
    q = _single_layer(np.full((2, 300), 254), 0, 2)
    x = np.ones((2, 300))
    res = emulate(q, x)
    assert res.synapse_clamps["out"] == 2 * 2 * 2   # per sample, output and step
    assert_matches_reference(q, x)


def test_float64_path_is_used_and_exact():
    seeds = [s for s in range(40)
             if any(p.dtype == torch.float64
                    for lp in engine.compile(random_qgraph(s, stress=True)).layers
                    for p in lp.synapses)]
    assert seeds, "no stress graph needed float64"
    q = random_qgraph(seeds[0], stress=True)
    assert_matches_reference(q, random_inputs(0, q, 3))


def _pooled_snn() -> SnnGraph:
    """conv -> (avgpool folded into) conv -> (avgpool folded into) dense -> readout."""
    rng = np.random.default_rng(1)

    def layer(name, shape, syn, readout=False):
        c = shape[0]
        return NeuronLayer(name, shape, (syn,), frozen_array(rng.normal(0, .1, c)),
                           frozen_array(np.ones(c)), frozen_array(np.full(c, .3)),
                           frozen_array(rng.normal(0, .05, (4, c))), readout)
    layers = (
        layer("c1", (4, 8, 8), Synapse(INPUT, "conv", rng.normal(0, .6, (4, 1, 3, 3)),
                                       padding=(1, 1))),
        layer("c2", (6, 4, 4), Synapse("c1", "conv", fold_avgpool_conv(rng.normal(0, .4, (6, 4, 3, 3))),
                                       stride=(2, 2), padding=(2, 2))),
        layer("fc", (5,), Synapse("c2", "dense", fold_avgpool_dense(rng.normal(0, .5, (5, 24)), (6, 2, 2)))),
        layer("out", (3,), Synapse("fc", "dense", rng.normal(0, 1, (3, 5))), readout=True),
    )
    return SnnGraph(InputSpec((1, 8, 8)), layers, 4)


def test_folded_pooling_is_factored_and_exact():
    q = quantize(_pooled_snn(), get_target("loihi2"))
    pools = {lp.name: lp.synapses[0].pool for lp in engine.compile(q).layers}
    assert pools == {"c1": 1, "c2": 2, "fc": 2, "out": 1}
    assert_matches_reference(q, np.random.default_rng(0).random((4, 1, 8, 8)))


def test_batch_size_does_not_change_results():
    q = random_qgraph(7, timesteps=5)
    x = random_inputs(7, q, 9)
    a, b = emulate(q, x, batch_size=2, record=True), emulate(q, x, batch_size=512, record=True)
    np.testing.assert_array_equal(a.readout, b.readout)
    for name in a.spikes:
        np.testing.assert_array_equal(a.spikes[name], b.spikes[name])
    assert a.saturations == b.saturations and a.spike_counts == b.spike_counts


def test_result_fields():
    q = random_qgraph(8, timesteps=5)
    x = random_inputs(8, q, 6)
    y = np.arange(6) % q.readout.shape[0]
    res = emulate(q, x, y, record=True)
    assert res.readout.shape == (5, 6, q.readout.shape[0]) and res.readout.dtype == np.int64
    np.testing.assert_array_equal(res.predictions, res.readout.argmax(axis=2))
    np.testing.assert_allclose(res.accuracy, (res.predictions == y).mean(axis=1) * 100)
    for name, s in res.spikes.items():
        assert s.dtype == np.uint8 and res.spike_counts[name] == pytest.approx(s.sum() / 6)
    plain = emulate(q, x)
    assert plain.spikes is None and plain.accuracy is None


def test_progress_bar_on_stderr(capsys):
    q = random_qgraph(9)
    emulate(q, random_inputs(9, q, 2), progress=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "emulate" in captured.err


def test_bad_input_shape():
    q = random_qgraph(0)
    with pytest.raises(InputError):
        emulate(q, np.zeros((2, 99)))


def test_half_built_progress_bar_is_finalised_quietly():
    """A signal landing inside tqdm's constructor leaves a bar without its attributes; its
    finaliser must not print 'Exception ignored' noise after the interrupted message."""
    import gc
    import sys
    from sims.progress import _Bar
    seen = []
    old, sys.unraisablehook = sys.unraisablehook, seen.append
    try:
        bar = _Bar.__new__(_Bar)
        bar.disable = False  # tqdm.__init__ sets this a few lines before ``pos``
        del bar
        gc.collect()
    finally:
        sys.unraisablehook = old
    assert seen == []
