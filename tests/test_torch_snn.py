"""Float SNN simulator: hand-computed traces, a naive per-step reference, ANN agreement."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.ir import INPUT, InputSpec, NeuronLayer, SnnGraph, Synapse, frozen_array
from sims.torch_snn import simulate
from tests.ann_builders import residual_graph, train_digits_cnn
from tests.snn_reference import naive_snn
from toolchain.ann import ann_accuracy
from toolchain.convert import convert

torch.set_num_threads(1)


def _layer(name, source, w, theta, v_init, bias=0.0, schedule=None, readout=False):
    n = np.asarray(w).shape[0]
    return NeuronLayer(name, (n,), (Synapse(source, "dense", frozen_array(w)),),
                       frozen_array(np.full(n, bias)), frozen_array(np.full(n, theta)),
                       frozen_array(np.full(n, v_init)),
                       None if schedule is None else frozen_array(schedule), readout)


def _one_neuron(theta, v_init, steps, schedule=None, w_out=2.0):
    hidden = _layer("h", INPUT, [[1.0]], theta, v_init, schedule=schedule)
    out = _layer("out", "h", [[w_out]], 1.0, 0.0, readout=True)
    return SnnGraph(InputSpec((1,)), (hidden, out), steps)


def test_one_neuron_ge_compare_and_subtractive_reset():
    # v0 = 0.5; +0.25 per step: 0.75, 1.0 (>= fires, v -> 0), 0.25, 0.5, 0.75, 1.0 (fires)
    res = simulate(_one_neuron(1.0, 0.5, 6), np.array([[0.25]]), record_spikes=True,
                   dtype=torch.float64)
    np.testing.assert_array_equal(res.spikes["h"][:, 0, 0], [0, 1, 0, 0, 0, 1])
    assert res.spike_counts == {"h": 2.0}


def test_spike_carries_threshold_and_readout_accumulates():
    # theta 2, v0 = 1, input 0.5: 1.5, 2.0 (fires, -> 0), 0.5, 1.0, 1.5, 2.0 (fires)
    res = simulate(_one_neuron(2.0, 0.5, 6), np.array([[0.5]]), dtype=torch.float64)
    snn = _one_neuron(2.0, 0.5, 6)
    from sims.torch_snn import run_network
    readout = run_network(snn, np.array([[0.5]]), dtype=torch.float64).readout[:, 0, 0]
    np.testing.assert_array_equal(readout.numpy(), [0, 4, 4, 4, 4, 8])  # 2 * theta per spike
    assert res.predictions.shape == (6, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fire_and_reset_are_the_bool_compare_and_where_bit_for_bit(dtype):
    """The engine's in-place step (``ge`` into a float buffer, ``addcmul`` reset) gives what
    ``v >= theta`` and ``torch.where(s, v - theta, v)`` give, ties and signed zeros included."""
    from sims.engine import LayerPlan, charge, settle
    rng = np.random.default_rng(0)
    theta = torch.tensor(rng.uniform(0.5, 2.0, (4, 1, 1)), dtype=dtype)
    v = torch.tensor(rng.normal(0, 1.5, (6, 4, 3, 3)), dtype=dtype)
    v[0] = theta  # exact ties fire
    v[1, :, 0, 0] = -0.0  # signed zeros survive the reset
    v[1, :, 0, 1] = torch.nextafter(theta[:, 0, 0], torch.zeros(()).to(dtype))  # just below
    zero = torch.zeros((4, 1), dtype=dtype)
    lp = LayerPlan(name="h", shape=(4, 3, 3), n=36, channels=4, synapses=(),
                   schedule=zero[None], bias=zero, v_init=zero[:, 0],
                   vth=theta.expand(4, 3, 3).reshape(-1), readout=False, dtype=dtype)
    flat = v.reshape(6, -1).clone()
    out = torch.empty_like(flat)
    settle(lp, charge(lp, flat, torch.zeros_like(flat)), zero[:, 0], out, torch.empty_like(flat))
    pre = v + 0.0 + 0.0 + 0.0
    want = torch.where(pre >= theta, pre - theta, pre).reshape(6, -1)
    assert out.dtype == dtype and torch.equal(out.bool(), (pre >= theta).reshape(6, -1))
    assert torch.equal(flat, want) and torch.equal(flat.signbit(), want.signbit())


def test_bias_schedule_applies_at_its_step_only():
    sched = np.zeros((4, 1))
    sched[0, 0] = 0.5  # step 1: 0 + 0.25 + 0.5 = 0.75; step 2: 1.0 fires; 0.25; 0.5
    res = simulate(_one_neuron(1.0, 0.0, 4, schedule=sched), np.array([[0.25]]),
                   record_spikes=True, dtype=torch.float64)
    np.testing.assert_array_equal(res.spikes["h"][:, 0, 0], [0, 1, 0, 0])


def test_vectorised_simulator_equals_naive_reference_on_residual_graph():
    rng = np.random.default_rng(1)
    x = rng.random((5, 1, 8, 8))
    snn = convert(residual_graph(1), rng.random((64, 1, 8, 8)), timesteps=5)
    sched = {l.name: rng.normal(0, 0.05, (5, l.channels)) for l in snn.layers}
    from core.ir import evolve
    snn = evolve(snn, layers=tuple(evolve(l, bias_schedule=sched[l.name])
                                   for l in snn.layers))
    res = simulate(snn, x, record_spikes=True, dtype=torch.float64, batch_size=3)
    ref = naive_snn(snn, x)
    for name, spikes in res.spikes.items():
        np.testing.assert_array_equal(spikes, ref[name].astype(np.uint8))
    np.testing.assert_array_equal(res.predictions, ref["fc"].argmax(-1))
    assert sum(res.spike_counts.values()) > 0


@pytest.fixture(scope="module")
def trained():
    return train_digits_cnn()


def test_large_T_approaches_ann_and_batching_is_invisible(trained):
    ann, data = trained
    ann_acc = ann_accuracy(ann, data.x_test, data.y_test)
    snn = convert(ann, data.x_train[:512], timesteps=48)
    res = simulate(snn, data.x_test, data.y_test)
    assert res.accuracy.shape == (48,) and res.predictions.shape == (48, len(data.x_test))
    assert ann_acc > 95.0
    assert res.accuracy[-1] >= ann_acc - 1.5
    assert res.accuracy[-1] > res.accuracy[0]
    small = simulate(snn, data.x_test[:50], data.y_test[:50], batch_size=7)
    np.testing.assert_array_equal(small.predictions, res.predictions[:, :50])
