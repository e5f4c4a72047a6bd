"""The signed neuron (``--neuron signed``): the integer reference by hand, the emulator and the
float engine against their references, the spike cache, conversion and the integer calibration
(the float calibration against the authors' loop: ``tests/test_calibrate.py``; Lava and the
netx file: ``tests/test_signed_lava.py``)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InputError
from core.ir import (INPUT, QLayer, QSynapse, QuantGraph, SnnGraph, SynapseKind,
                     evolve, frozen_array)
from exporters.quantize import quantize
from hw_targets import get_target
from sims.reference import run_layer
from sims.torch_snn import simulate
from tests.qgraph_builders import random_inputs, random_qgraph, random_snn
from tests.snn_reference import naive_snn
from tests.test_emulator import assert_matches_reference
from toolchain.calibration import SIGNED_FORMS, DiskTrain


def signed(graph: SnnGraph | QuantGraph) -> SnnGraph | QuantGraph:
    """``graph`` with every spiking layer made signed."""
    return evolve(graph, layers=tuple(l if l.readout else evolve(l, signed=True)
                                      for l in graph.layers))


def _one_neuron(signed_: bool) -> QLayer:
    syn = QSynapse(INPUT, SynapseKind.DENSE, frozen_array(np.ones((1, 1)), np.int64))
    return QLayer(name="l", shape=(1,), synapses=(syn,), vth=frozen_array([64], np.int64),
                  bias_mant=frozen_array(np.zeros((6, 1)), np.int64), bias_exp=0,
                  v_init=frozen_array([32], np.int64), depth=1,
                  scale=frozen_array([64.0], np.float64), signed=signed_)


def test_reference_by_hand():
    # input current a (<< 6 = x 64): a strong start, then negative input. v0 = 32, vth = 64.
    a = np.array([[2], [0], [-1], [-1], [-1], [0]], dtype=np.int64)
    # IF: v 160 -> s 1, v 96 -> s 1, v 32 | 32 -> 0 | -32 | -96 | -160 | -160: spikes 1 1 0 0 0 0
    np.testing.assert_array_equal(run_layer(_one_neuron(False), a)[:, 0], [1, 1, 0, 0, 0, 0])
    # signed: v 160 -> +1 (96), 96 -> +1 (32), -32 < 0 with count 2 -> -1 (32, count 1),
    # -32 -> -1 (32, count 0), -32 with count 0 -> 0 (-32), -32 -> 0: net 0, the ReLU of the
    # summed input 2 - 3 < 0 (an IF neuron keeps its 2 early spikes)
    np.testing.assert_array_equal(run_layer(_one_neuron(True), a)[:, 0], [1, 1, -1, -1, 0, 0])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), conv=st.booleans(),
       topology=st.sampled_from(["chain", "branch", "skip"]), stress=st.booleans(),
       steps=st.integers(1, 6), n=st.integers(1, 4), batch=st.integers(1, 3))
def test_emulator_equals_reference_signed(seed, conv, topology, stress, steps, n, batch):
    q = signed(random_qgraph(seed, timesteps=steps, conv=conv, topology=topology, stress=stress))
    assert_matches_reference(q, random_inputs(seed, q, n), batch_size=batch)


def test_signed_networks_send_minus_one():
    """The cases above do exercise -1 spikes (a check that the property test is not vacuous)."""
    from sims.emulator import emulate
    q = signed(random_qgraph(1, timesteps=6))
    res = emulate(q, random_inputs(1, q, 4), record=True)
    spikes = np.concatenate([s.ravel() for s in res.spikes.values()])
    assert (spikes == -1).any() and (spikes == 1).any()
    assert all(s.dtype == np.int8 for s in res.spikes.values())
    # activity counts every spike sent, +1 and -1 alike, and the -1 spikes on their own
    for name, s in res.spikes.items():
        np.testing.assert_array_equal(res.neuron_spikes[name],
                                      np.abs(s.astype(np.int64)).sum(axis=(0, 1)))
        assert res.negative_spikes[name] == int((s < 0).sum())
    assert emulate(random_qgraph(1, timesteps=6), random_inputs(1, q, 4)).negative_spikes == {
        name: 0 for name in res.spikes}


def test_netlist_counts_what_the_signed_neuron_costs():
    """A signed layer: kind if+signed, a second 24-bit state word per neuron (which can split
    a layer over more cores), 2-bit graded messages on the synapses reading it (8 from the
    input, 0 from an IF layer), and its -1 spikes in the activity."""
    from exporters.netlist import build_netlist, netlist_summary_lines
    from hw_targets.loihi2_resources import LOIHI2
    from sims.activity import measure_activity
    from sims.emulator import emulate
    from tests import lava_builders as lb
    target = get_target("loihi2")
    plain = lb.residual_net(0)
    q = signed(plain)
    small = replace(LOIHI2, limits=replace(LOIHI2.limits, neurons_per_core=8,
                                           neuron_state_bits_per_core=8 * 24))
    n_if, n_signed = (build_netlist(g, target, resources=small) for g in (plain, q))
    for n, kind, bits, graded in ((n_if, "if", 24, 0), (n_signed, "if+signed", 48, 2)):
        assert [l["kind"] for l in n["layers"]] == [kind] * 3 + ["readout"]
        assert [l["neuron_state_bits"] for l in n["layers"]] == [bits] * 3 + [24]
        for l in n["layers"]:
            assert [s["message_bits"] for s in l["synapses"]] == [
                8 if s["source"] == INPUT else graded for s in l["synapses"]]
            assert sum(c["neuron_state_bits"] for c in l["cores"]) == (
                l["neurons"] * l["neuron_state_bits"])
    # a core holds 8 one-word neurons or 4 two-word ones: the signed layers need twice the cores
    neurons = [l["neurons"] for l in n_if["layers"]]
    assert [len(l["cores"]) for l in n_if["layers"]] == [-(-k // 8) for k in neurons]
    assert [len(l["cores"]) for l in n_signed["layers"]] == [
        -(-k // 4) for k in neurons[:-1]] + [-(-neurons[-1] // 8)]
    spiking = sum(neurons[:-1])
    assert (n_if["totals"]["signed_neurons"], n_signed["totals"]["signed_neurons"]) == (0, spiking)
    from_input = sum(s["connections"] for l in n_if["layers"] for s in l["synapses"]
                     if s["source"] == INPUT)
    assert n_if["totals"]["graded_connections"] == from_input
    assert n_signed["totals"]["graded_connections"] == n_signed["totals"]["connections"]
    assert any("signed neurons" in line for line in netlist_summary_lines(n_signed))
    assert not any("signed neurons" in line for line in netlist_summary_lines(n_if))
    # the -1 spikes per inference, measured, in the netlist's activity
    q = signed(random_qgraph(1, timesteps=6))
    x = random_inputs(1, q, 4)
    trains = emulate(q, x, record=True).spikes
    act = build_netlist(q, target, measure_activity(q, x))["activity"]
    for rec in act["layers"][:-1]:
        assert rec["negative_spikes"] == round(float((trains[rec["name"]] < 0).sum()) / 4, 4)
    assert act["totals"]["negative_spikes"] > 0


@pytest.mark.parametrize("seed,topology", [(0, "chain"), (1, "branch"), (2, "skip")])
def test_float_engine_equals_naive_signed(seed, topology):
    snn = signed(random_snn(seed, timesteps=6, topology=topology, gain=3.0, input_norm=False))
    x = random_inputs(seed, snn, 3)
    res = simulate(snn, x, record_spikes=True, dtype=torch.float64)
    ref = naive_snn(snn, x)
    minus = 0
    for layer in snn.layers:
        if not layer.readout:
            got = res.spikes[layer.name]
            np.testing.assert_array_equal(got, ref[layer.name])
            minus += int((got == -1).sum())
    assert minus > 0


def test_disk_train_keeps_minus_one():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.integers(-1, 2, (5, 3, 4, 3, 3)).astype(np.int8))
    cached = DiskTrain(train.to(torch.float32), signed=True)
    np.testing.assert_array_equal(cached[0:5].numpy(), train.numpy())
    np.testing.assert_array_equal(cached[2:4].numpy(), train[2:4].numpy())
    assert cached[0:1].dtype == torch.int8


def test_quantize_keeps_signed_and_readout_never_signed():
    snn = signed(random_snn(3))
    q = quantize(snn, get_target("loihi2"))
    assert [l.signed for l in q.layers] == [not l.readout for l in q.layers]


def test_convert_neuron_option():
    from tests.ann_builders import residual_graph
    from toolchain.convert import convert
    ann = residual_graph()
    x = np.random.default_rng(0).random((16, 1, 8, 8)).astype(np.float32)
    snn = convert(ann, x, timesteps=4, neuron="signed")
    assert [l.signed for l in snn.layers] == [not l.readout for l in snn.layers]
    assert snn.meta["neuron"] == "signed"
    assert not any(l.signed for l in convert(ann, x, timesteps=4).layers)
    with pytest.raises(InputError, match="neuron must be one of"):
        convert(ann, x, timesteps=4, neuron="lif")


@pytest.fixture(scope="module")
def digits():
    from tests.ann_builders import train_digits_cnn
    ann, data = train_digits_cnn()
    order = np.random.default_rng(0).permutation(len(data.x_train))
    return ann, data.x_train[order[:400]], data


def test_fixed_calibration_of_a_signed_network_stays_exact(digits):
    """The integer FTBC runs on a signed network, keeps it signed, and its result still
    equals the integer reference spike for spike."""
    from toolchain.calibrate import calibrate
    from toolchain.calibrate_fixed import calibrate_fixed, float_thresholds
    from toolchain.convert import convert
    from toolchain.normalize import normalize
    ann, x_calib, data = digits
    snn = convert(ann, x_calib, timesteps=4, neuron="signed")
    snn, _ = calibrate(snn, ann, x_calib, method="ftbc", batches=2, batch_size=64)
    target = get_target("loihi2")
    q = quantize(normalize(snn), target)
    q2, _ = calibrate_fixed(q, ann, x_calib, thresholds=float_thresholds(snn), target=target,
                            batches=2, batch_size=64, holdout=0.0)
    assert all(l.signed for l in q2.layers if not l.readout)
    assert any(not np.array_equal(a.bias_mant, b.bias_mant)
               for a, b in zip(q.layers, q2.layers))
    assert_matches_reference(q2, data.x_test[:6])



def _assert_best_form_kept(report: dict, schedules: dict) -> list[str]:
    """Every entry scored both forms on the held-out images and names the better as its
    form; a kept constant form is constant over the steps. Returns the kept forms."""
    kept = []
    for name, entry in report["layers"].items():
        errors = entry["holdout_error_forms"]
        assert set(errors) == set(SIGNED_FORMS)
        assert entry["form"] == min(errors, key=errors.get)
        assert entry["holdout_error_after"] == errors[entry["form"]]
        assert entry["kept"] == (entry["holdout_error_after"] < entry["holdout_error_before"])
        if entry["kept"]:
            kept.append(entry["form"])
            if entry["form"] == "constant":
                assert np.all(schedules[name] == schedules[name][:1]), name
    return kept


def test_signed_layers_keep_the_better_form_of_ftbc(digits):
    """FTBC on a signed layer scores its per-step schedule and its constant form (each
    channel's mean over the steps) on the held-out images and keeps the better one when it
    beats the layer as it stands, in the float and in the integer calibration (T = 3, seed 1
    keeps a constant form in both); IF layers have one form and report as before."""
    from toolchain.calibrate import calibrate
    from toolchain.calibrate_fixed import calibrate_fixed, float_thresholds
    from toolchain.convert import convert
    from toolchain.normalize import normalize
    ann, x_calib, data = digits
    settings = dict(batches=2, batch_size=64, seed=1)
    snn, report = calibrate(convert(ann, x_calib, timesteps=3, neuron="signed"), ann, x_calib,
                            method="ftbc", **settings)
    kept = _assert_best_form_kept(report, {l.name: l.bias_schedule for l in snn.layers})
    assert "constant" in kept and "per-step" in kept
    target = get_target("loihi2")
    q, report = calibrate_fixed(quantize(normalize(snn), target), ann, x_calib,
                                thresholds=float_thresholds(snn), target=target, **settings)
    assert "constant" in _assert_best_form_kept(report, {l.name: l.bias_mant for l in q.layers})
    assert_matches_reference(q, data.x_test[:6])
    _, report = calibrate(convert(ann, x_calib, timesteps=3), ann, x_calib, method="ftbc",
                          **settings)
    assert not any("form" in entry for entry in report["layers"].values())

def test_nir_metadata_says_which_layers_are_signed():
    from exporters.nir_export import to_nir
    snn = random_snn(0, timesteps=3)
    g = to_nir(evolve(snn, layers=(evolve(snn.layers[0], signed=True),) + snn.layers[1:]))
    first, second = snn.layers[0].name, snn.layers[1].name
    assert g.nodes[first].metadata["ftbc_neuron"] == "signed_subtract"
    assert "v < 0" in g.nodes[first].metadata["negative_spike"]
    assert g.nodes[second].metadata["ftbc_neuron"] == "if_subtract"
    assert "negative_spike" not in g.nodes[second].metadata
