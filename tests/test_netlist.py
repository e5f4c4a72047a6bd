"""Netlist and resource estimate (exporters/netlist.py, sims/activity.py)."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from core.errors import InputError
from core.ir import INPUT, QSynapse
from exporters.netlist import (build_netlist, connectivity, netlist_json,
                               netlist_summary_lines, placement_order, write_netlist)
from exporters.quantize import quantize
from hw_targets import get_target
from hw_targets.loihi2_resources import LOIHI2, CoreLimits
from sims.activity import measure_activity
from sims.emulator import emulate
from tests import lava_builders as lb
from tests.qgraph_builders import mnist_like_snn, random_qgraph

LOIHI2_TARGET = get_target("loihi2")


def small(**limits) -> object:
    """Loihi 2 resources with some core limits changed (tests of the split)."""
    return replace(LOIHI2, limits=replace(CoreLimits(), **limits))


def brute_force(syn: QSynapse, src: tuple, out: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Fan-in per output and fan-out per source of a conv, by visiting every output, every
    tap and checking the input position by hand."""
    w = np.asarray(syn.weight)
    o_n, ig, kh, kw = w.shape
    c, h, wd = src
    fan_in, fan_out = np.zeros(out, np.int64), np.zeros(src, np.int64)
    og = o_n // syn.groups
    for o in range(o_n):
        for y in range(out[1]):
            for x in range(out[2]):
                for ci in range(ig):
                    for i in range(kh):
                        for j in range(kw):
                            yy = y * syn.stride[0] - syn.padding[0] + i * syn.dilation[0]
                            xx = x * syn.stride[1] - syn.padding[1] + j * syn.dilation[1]
                            if w[o, ci, i, j] and 0 <= yy < h and 0 <= xx < wd:
                                fan_in[o, y, x] += 1
                                fan_out[(o // og) * ig + ci, yy, xx] += 1
    return fan_in.ravel(), fan_out.ravel()


def conv_synapses():
    """Every conv synapse of several graphs (padding, stride, dilation, groups), with a
    third of the weights zeroed so the non-zero rule matters."""
    rng = np.random.default_rng(0)
    graphs = [lb.conv_net(0)] + [random_qgraph(s, conv=True) for s in range(6)]
    for q in graphs:
        shapes = {INPUT: q.input.shape, **{l.name: l.shape for l in q.layers}}
        for layer in q.layers:
            for s in layer.synapses:
                if s.kind == "conv":
                    w = np.where(rng.random(s.weight.shape) < 0.33, 0, s.weight)
                    yield replace(s, weight=w), tuple(shapes[s.source]), tuple(layer.shape)


@pytest.mark.parametrize("case", list(conv_synapses()), ids=lambda c: f"{c[1]}->{c[2]}")
def test_conv_connections_match_brute_force(case):
    syn, src, out = case
    conn = connectivity(syn, src, out)
    fan_in, fan_out = brute_force(syn, src, out)
    np.testing.assert_array_equal(conn.fan_in, fan_in)
    np.testing.assert_array_equal(conn.fan_out, fan_out)
    assert conn.connections == fan_in.sum() == fan_out.sum()
    assert conn.weights_nonzero == np.count_nonzero(syn.weight)


def test_dense_counts_on_hand_made_chain():
    q = lb.dense_chain(0)
    n = build_netlist(q, LOIHI2_TARGET)
    for rec, layer in zip(n["layers"], q.layers):
        nz = np.asarray(layer.synapses[0].weight) != 0
        assert rec["neurons"] == layer.shape[0]
        assert rec["connections"] == nz.sum() == rec["synapses"][0]["weights_nonzero"]
        assert rec["fan_in"] == {"max": int(nz.sum(1).max()), "mean": round(nz.sum(1).mean(), 4)}
        assert rec["synapses"][0]["ann_macs"] == nz.size
        assert rec["bias_schedule"]["mantissas"] == q.timesteps * layer.shape[0]
        assert rec["bias_schedule"]["bits"] == q.timesteps * layer.shape[0] * 13
        assert rec["weight_bits"] == 8
    # fan-out of fc1 = non-zero column counts of fc2's weight
    nz2 = np.asarray(q.layers[1].synapses[0].weight) != 0
    assert n["layers"][0]["fan_out"]["max"] == nz2.sum(0).max()
    assert n["totals"]["cores"] == len(q.layers) and n["totals"]["chips"] == 1 and n["fits"]


def test_conv_macs_and_folded_pool():
    q = quantize(mnist_like_snn(0, 4), LOIHI2_TARGET)
    layers = {l["name"]: l for l in build_netlist(q, LOIHI2_TARGET)["layers"]}
    assert layers["conv1"]["synapses"][0]["ann_macs"] == 16 * 28 * 28 * 9
    # conv2 is a 3x3 conv on the 2x2-average-pooled conv1 output: ANN MACs 32*14*14*16*9
    assert layers["conv2"]["synapses"][0]["pool_folded"]
    assert layers["conv2"]["synapses"][0]["ann_macs"] == 32 * 14 * 14 * 16 * 9
    assert layers["fc1"]["synapses"][0]["ann_macs"] == 128 * 32 * 7 * 7


def check_cores(netlist, limits: CoreLimits) -> None:
    """Every layer's ranges tile its neurons once, in order; every core within the limits
    that no single neuron violates (those are reported instead)."""
    violated = {(v["layer"], v["quantity"]) for v in netlist["violations"]}
    numbers = [c["core"] for l in netlist["layers"] for c in l["cores"]]
    assert numbers == list(range(netlist["totals"]["cores"]))
    for layer in netlist["layers"]:
        edges = [tuple(c["range"]) for c in layer["cores"]]
        assert edges[0][0] == 0 and edges[-1][1] == layer["neurons"]
        assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
        assert sum(c["synapses"] for c in layer["cores"]) == layer["connections"]
        for c in layer["cores"]:
            assert c["neurons"] == c["range"][1] - c["range"][0] <= limits.neurons_per_core
            assert c["synapse_memory_bits"] <= limits.synapse_memory_bits_per_core
            assert (c["fan_in_axons"] <= limits.fan_in_axons_per_core
                    or (layer["name"], "fan_in_axons") in violated)
            assert c["bias_schedule_bits"] <= limits.bias_memory_bits_per_core
    cores = netlist["totals"]["cores"]
    assert netlist["totals"]["chips"] == math.ceil(cores / limits.cores_per_chip)


@pytest.mark.parametrize("limits", [
    dict(neurons_per_core=5, cores_per_chip=4),
    dict(synapse_memory_bits_per_core=8 * 300),
    dict(fan_in_axons_per_core=40),
    dict(bias_memory_bits_per_core=13 * 5 * 2),
])
def test_layers_larger_than_a_core_are_split(limits):
    q = lb.conv_net(0)
    res = small(**limits)
    n = build_netlist(q, LOIHI2_TARGET, resources=res)
    assert n["fits"], n["violations"]
    assert n["totals"]["cores"] > len(q.layers)
    assert max(len(l["cores"]) for l in n["layers"]) > 1
    check_cores(n, res.limits)


def test_default_loihi2_placement_of_mnist_shape():
    q = quantize(mnist_like_snn(0, 8), LOIHI2_TARGET)
    n = build_netlist(q, LOIHI2_TARGET)
    check_cores(n, CoreLimits())
    layers = {l["name"]: l for l in n["layers"]}
    assert layers["conv1"]["placement_order"] == "hwc" and layers["fc1"]["placement_order"] == "flat"
    assert n["totals"]["neurons"] == 16 * 28 * 28 + 32 * 14 * 14 + 128 + 10
    # fc1 reads 6272 inputs: more than the assumed 4096 input axons of one core
    assert [(v["layer"], v["quantity"]) for v in n["violations"]] == [("fc1", "fan_in_axons")]


def test_neuron_exceeding_a_core_is_a_violation():
    q = lb.dense_chain(0)   # fc1 neurons read 12 inputs
    n = build_netlist(q, LOIHI2_TARGET, resources=small(fan_in_axons_per_core=8))
    assert not n["fits"]
    bad = {(v["layer"], v["quantity"]) for v in n["violations"]}
    assert ("fc1", "fan_in_axons") in bad
    assert all(v["limit_source"] == "assumption" for v in n["violations"])
    assert any("does not fit" in line for line in netlist_summary_lines(n))


def test_placement_order_is_position_major():
    order = placement_order((2, 2, 3))
    assert list(order[:2]) == [0, 6]          # (c0, y0, x0), (c1, y0, x0)
    assert sorted(order) == list(range(12))


def test_activity_synops_equal_recorded_spikes_times_fan_out():
    q = lb.conv_net(1)
    x = lb.random_inputs(q, 7)
    act = measure_activity(q, x, batch_size=3, source="test")
    rec = emulate(q, x, record=True)
    for name, counts in rec.spike_counts.items():
        assert act["spikes"][name].sum() == pytest.approx(counts)
    n = build_netlist(q, LOIHI2_TARGET, act)
    shapes = {l.name: tuple(l.shape) for l in q.layers}
    for layer, a in zip(q.layers[1:], n["activity"]["layers"][1:]):
        syn = layer.synapses[0]
        conn = connectivity(syn, shapes[syn.source], tuple(layer.shape))
        spikes = rec.spikes[syn.source].reshape(q.timesteps * len(x), -1).sum(0) / len(x)
        assert a["synops"] == pytest.approx(spikes @ conn.fan_out, rel=1e-6)
        assert a["synops_method"] == "per_neuron"
        assert a["neuron_updates"] == int(np.prod(layer.shape)) * q.timesteps
    tot = n["activity"]["totals"]
    assert tot["spikes"] == pytest.approx(sum(rec.spike_counts.values()), rel=1e-6)
    energy = n["activity"]["energy"]
    assert energy["estimate"] and energy["snn_total_nj"] > 0


def test_scalar_spike_counts_use_mean_fan_out():
    q = lb.dense_chain(0)
    res = emulate(q, lb.random_inputs(q, 5))
    act = {"samples": 5, "input_events": 12 * q.timesteps, "spikes": dict(res.spike_counts)}
    n = build_netlist(q, LOIHI2_TARGET, act)
    assert {a["synops_method"] for a in n["activity"]["layers"]} == {"mean_fan_out"}


def test_file_is_deterministic_and_atomic(tmp_path):
    q = lb.conv_net(0)
    act = measure_activity(q, lb.random_inputs(q, 4))
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_netlist(build_netlist(q, LOIHI2_TARGET, act), a)
    write_netlist(build_netlist(q, LOIHI2_TARGET, act), b)
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]
    assert json.loads(a.read_text()) == json.loads(netlist_json(build_netlist(q, LOIHI2_TARGET, act)))


def test_schema_keys():
    q = lb.residual_net(0)
    n = build_netlist(q, LOIHI2_TARGET, measure_activity(q, lb.random_inputs(q, 3)))
    assert list(n) == ["format", "version", "target", "timesteps", "resources", "input",
                       "layers", "totals", "fits", "violations", "activity"]
    assert list(n["layers"][0]) == ["name", "origin", "kind", "shape", "neurons",
                                    "neuron_state_bits", "depth", "delay_slots", "vth",
                                    "synapses", "connections", "fan_in", "fan_out",
                                    "weight_bits", "bias_schedule", "placement_order", "cores"]
    assert set(n["layers"][0]["cores"][0]) == {"core", "range", "neurons", "synapses",
                                               "synapse_memory_bits", "fan_in_axons",
                                               "bias_schedule_bits", "delay_slots",
                                               "neuron_state_bits"}
    assert "message_bits" in n["layers"][0]["synapses"][0]
    assert set(n["totals"]) == {"neurons", "signed_neurons", "neuron_state_bits",
                                "connections", "weights_nonzero", "bias_schedule_bits",
                                "delay_slots", "delayed_connections", "graded_connections",
                                "ann_macs", "cores", "chips"}
    assert "negative_spikes" in n["activity"]["layers"][0]
    assert set(n["activity"]) == {"samples", "source", "layers", "totals", "energy"}
    assert n["resources"]["cores_per_chip"] == {"value": 128, "source": "public"}
    assert len(n["layers"][2]["synapses"]) == 2          # the residual layer
    assert [l["kind"] for l in n["layers"]] == ["if", "if", "if", "readout"]


def test_synaptic_delays_and_their_slots_are_counted():
    """The skip net's shortcut a -> c waits one step: its synapse says delay 1, c's neurons
    need 2 accumulator slots each, every other layer 1; the totals count both."""
    q = lb.residual_net(0, same_depth=False)
    n = build_netlist(q, LOIHI2_TARGET)
    layers = {l["name"]: l for l in n["layers"]}
    assert [(s["source"], s["delay"]) for s in layers["c"]["synapses"]] == [("a", 1), ("b", 0)]
    assert [l["depth"] for l in n["layers"]] == [1, 2, 3, 4]
    assert {name: l["delay_slots"] for name, l in layers.items()} == {
        "a": 8, "b": 8, "c": 2 * 5, "out": 3}
    assert sum(core["delay_slots"] for core in layers["c"]["cores"]) == 10
    assert n["totals"]["delay_slots"] == 29
    assert n["totals"]["delayed_connections"] == layers["c"]["synapses"][0]["connections"] > 0
    assert any("delayed synapses" in line for line in netlist_summary_lines(n))
    # a core whose accumulator holds fewer slots splits the delayed layer
    small = replace(LOIHI2, limits=replace(LOIHI2.limits, delay_slots_per_core=4))
    cores = {l["name"]: len(l["cores"]) for l in build_netlist(q, LOIHI2_TARGET,
                                                                 resources=small)["layers"]}
    assert cores == {"a": 2, "b": 2, "c": 3, "out": 1}   # 4 + 4, 4 + 4, 2 x 2 + 2 x 2 + 2, 3


def test_non_chip_target_refused():
    with pytest.raises(InputError, match="not a chip"):
        build_netlist(lb.dense_chain(0), get_target("float"))


def test_neuron_spikes_equal_the_recorded_spike_trains():
    """The per-neuron counts every emulation returns (which the pipeline's netlist uses
    instead of emulating the evaluation set again) are the recorded trains summed."""
    q = lb.conv_net(1)
    x = lb.random_inputs(q, 9)
    rec = emulate(q, x, record=True, batch_size=4)
    for name, trains in rec.spikes.items():
        expected = trains.reshape(q.timesteps * len(x), -1).sum(0, dtype=np.int64)
        np.testing.assert_array_equal(rec.neuron_spikes[name], expected)
        assert rec.spike_counts[name] == expected.sum() / len(x)
