"""Real Lava runs (Loihi2SimCfg, fixed_pt) of exported files against the integer reference,
spike for spike. Small networks and a few samples: each run costs ~1-2 s."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest
from tests.lava_builders import (conv_net, dense_chain, edge_chain, random_inputs, residual_net,
                           threshold_net)

from core.errors import InputError
from core.ir import QuantGraph
from exporters.netx import write_netx
from sims.lava_procs.models import pack_spikes
from sims.lava_runner import (input_stream, lava_problems, period_of, run_lava,
                              unpack_spikes)
from sims.reference import encode_input, reference_run
from sims.verify import verify
from tests.qgraph_builders import accumulation_bound_readout
from tests.qgraph_builders import random_inputs as qgraph_inputs
from tests.qgraph_builders import random_qgraph

SAMPLES = 3


def _export(q, tmp_path):
    path = tmp_path / "net.net"
    write_netx(q, path)
    return str(path)


def reference_outputs(q: QuantGraph, x_int: np.ndarray
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The reference, sample by sample, stacked as (T, N, n)."""
    runs = [reference_run(q, x_int[k]) for k in range(x_int.shape[0])]
    spikes = {layer.name: np.stack([r[layer.name] for r in runs], axis=1).astype(np.uint8)
              for layer in q.layers if not layer.readout}
    readout = np.stack([r[q.readout.name] for r in runs], axis=1).astype(np.int64)
    return spikes, readout


def _assert_equal_to_reference(q, result, x_int):
    spikes, readout = reference_outputs(q, x_int)
    assert set(result.spikes) == set(spikes)
    for name, want in spikes.items():
        assert result.spikes[name].dtype == np.uint8
        np.testing.assert_array_equal(result.spikes[name], want, err_msg=name)
    assert result.readout.dtype == np.int64
    np.testing.assert_array_equal(result.readout, readout)


@pytest.mark.lava
@pytest.mark.parametrize("builder", [dense_chain, conv_net, edge_chain, residual_net],
                         ids=["dense", "conv", "edge", "residual"])
def test_lava_equals_reference(builder, tmp_path):
    """Graded input, negative biases, v_init, readout, conv stride/padding/dilation/groups,
    weight_exp +-1, all-negative weights, 24-bit saturation, a same-depth residual sum."""
    q = builder()
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    result = run_lava(_export(q, tmp_path), x_int)
    _assert_equal_to_reference(q, result, x_int)
    assert 0 < result.seconds
    some = [s.mean() for s in result.spikes.values()]
    assert max(some) > 0.05          # the test network is not silent


@pytest.mark.lava
def test_threshold_compare_is_greater_or_equal(tmp_path):
    q = threshold_net()
    x_int = encode_input(q.input, np.array([[50.0, 25.0], [25.0, 50.0]]))
    result = run_lava(_export(q, tmp_path), x_int)
    np.testing.assert_array_equal(result.spikes["fc1"][:, 0, 0], [0, 1, 0, 1])
    np.testing.assert_array_equal(result.spikes["fc1"][:, 1, 1], [0, 1, 0, 1])
    _assert_equal_to_reference(q, result, x_int)


@pytest.mark.lava
def test_runs_after_the_multiprocessing_start_method_was_fixed(tmp_path):
    """A tqdm bar (or anything) fixing the start method first must not break Lava's import."""
    q = dense_chain(sizes=(4, 3, 2), steps=2)
    path = _export(q, tmp_path)
    code = ("import multiprocessing as mp, sys, numpy as np; mp.set_start_method('fork');"
            "from sims.lava_runner import run_lava;"
            "r = run_lava(sys.argv[1], np.ones((1, 4), dtype=np.int64)); print(r.readout.shape)")
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(2, 1, 2)")


@pytest.mark.lava
def test_delay_alignment_in_a_deep_chain(tmp_path):
    """5 layers deep, T=3: the period (T + D = 8) is longer than T, so every layer's window
    and the discarding of the previous sample's in-flight spikes matter."""
    q = dense_chain(seed=3, sizes=(8, 12, 12, 10, 10, 4), steps=3)
    assert period_of(q) == 3 + 5
    x_int = encode_input(q.input, random_inputs(q, SAMPLES, seed=5))
    _assert_equal_to_reference(q, run_lava(_export(q, tmp_path), x_int), x_int)


@pytest.mark.lava
def test_floating_pt_model_matches_for_weight_exp_zero(tmp_path):
    q = conv_net(seed=2)
    x_int = encode_input(q.input, random_inputs(q, 2))
    result = run_lava(_export(q, tmp_path), x_int, select_tag="floating_pt")
    _assert_equal_to_reference(q, result, x_int)


@pytest.mark.lava
def test_verify_clean_and_catches_a_corrupted_bias_mantissa(tmp_path):
    q = dense_chain(seed=1)
    path = _export(q, tmp_path)
    x = random_inputs(q, SAMPLES, seed=2)
    y = np.array([0, 1, 2])
    clean = verify(q, path, x, y=y)
    assert clean["spike_mismatches"] == 0 and clean["readout_mismatches"] == 0
    assert clean["first_mismatch"] is None and clean["samples"] == SAMPLES
    assert 0.0 <= clean["accuracy"] <= 100.0
    with h5py.File(path, "r+") as f:        # layer 1 (fc2), step t=2, channel 3
        f["ftbc/layers/1/bias_mant"][1, 3] += 2000
    report = verify(q, path, x)
    assert report["spike_mismatches"] > 0
    first = report["first_mismatch"]
    assert first["layer"] == "fc2" and first["step"] >= 2 and first["sample"] == 0
    assert first["lava"] != first["emulator"]


@pytest.mark.lava
@pytest.mark.parametrize("topology", ["chain", "branch"])
def test_quantized_random_graph_verifies_against_emulator(topology, tmp_path):
    """The real quantizer's output, checked by verify() against the fast emulator."""
    q = random_qgraph(4, topology=topology, timesteps=5)
    report = verify(q, _export(q, tmp_path), qgraph_inputs(2, q, SAMPLES))
    assert report["expected_from"] == "emulator"
    assert report["spike_mismatches"] == 0 and report["readout_mismatches"] == 0


@pytest.mark.lava
def test_readout_shifted_right_by_its_weight_exponent_in_lava(tmp_path):
    """A readout whose accumulation bound set its scale (weight mantissas at 8 bits,
    weight_exp = -k: a floor every step) runs in Lava exactly as in the emulator."""
    _, q, _ = accumulation_bound_readout(1, "loihi2-sim")
    assert all(s.weight_exp < 0 for s in q.readout.synapses)
    report = verify(q, _export(q, tmp_path), qgraph_inputs(1, q, SAMPLES))
    assert report["spike_mismatches"] == 0 and report["readout_mismatches"] == 0
    assert report["expected_from"] == "emulator"


@pytest.mark.lava
@pytest.mark.parametrize("q", [residual_net(same_depth=False),
                               random_qgraph(0, topology="skip")], ids=["hand", "quantized"])
def test_skip_connection_across_depths_runs_with_a_synaptic_delay(q, tmp_path, monkeypatch):
    """The shortcut's synapse waits depth difference steps in a DelaySparse (dense weights,
    or a conv as its sparse matrix): Lava equals the reference. Without the delay the same
    file runs misaligned, so the delay is what makes it exact."""
    import sims.lava_runner
    from hw_targets.timing import synaptic_delays
    assert max(max(d) for d in synaptic_delays(q.layers).values()) == 1
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    path = _export(q, tmp_path)
    _assert_equal_to_reference(q, run_lava(path, x_int), x_int)
    monkeypatch.setattr(sims.lava_runner, "synaptic_delays",
                        lambda layers: {l.name: (0,) * len(l.synapses) for l in layers})
    with pytest.raises(AssertionError):
        _assert_equal_to_reference(q, run_lava(path, x_int), x_int)


@pytest.mark.lava
def test_graded_input_through_a_delayed_synapse(tmp_path):
    """A layer three hops deep that also reads the graded input: that synapse waits 2 steps
    and carries 8-bit messages (DelaySparse with num_message_bits 8)."""
    from tests.lava_builders import dense, even_weights
    from core.ir import INPUT
    q = residual_net(same_depth=False)
    a, b, c, out = q.layers
    rng = np.random.default_rng(4)
    c = replace(c, synapses=(dense(INPUT, even_weights(rng, (5, 6), 12)), c.synapses[1]))
    q = replace(q, layers=(a, b, c, out))
    from hw_targets.timing import synaptic_delays
    assert synaptic_delays(q.layers)["c"] == (2, 0)
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    result = run_lava(_export(q, tmp_path), x_int)
    _assert_equal_to_reference(q, result, x_int)
    assert result.spikes["c"].any()


@pytest.mark.lava
@pytest.mark.parametrize("pixels", [0, 1 << 20], ids=["all-conv", "all-sparse"])
def test_conv_synapses_run_exactly_as_conv_or_as_sparse(pixels, tmp_path, monkeypatch):
    """Every conv synapse through Lava's Conv, then every one through Sparse (its exact
    matrix; what small output planes use): the same spikes as the reference either way."""
    import sims.lava_runner
    from sims.lava_runner import runs_sparse
    monkeypatch.setattr(sims.lava_runner, "SPARSE_CONV_MAX_PIXELS", pixels)
    q = conv_net()
    convs = [(s, l) for l in q.layers for s in l.synapses if s.kind == "conv"]
    assert len(convs) >= 2 and {runs_sparse(s, l) for s, l in convs} == {pixels > 0}
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    result = run_lava(_export(q, tmp_path), x_int)
    _assert_equal_to_reference(q, result, x_int)
    assert max(s.mean() for s in result.spikes.values()) > 0.05


@pytest.mark.parametrize("block", [1, 1 << 22], ids=["one-channel-blocks", "default"])
def test_conv_matrix_is_the_reference_conv(monkeypatch, block):
    """The sparse matrix a conv runs as in Lava (delayed, or small outputs) equals the
    reference's cross-correlation (stride, padding, dilation, groups), zero weights left
    out, however it is blocked over output channels."""
    import sims.lava_runner
    from sims.lava_runner import conv_matrix
    from sims.reference import synapse_output
    monkeypatch.setattr(sims.lava_runner, "CONV_MATRIX_BLOCK", block)
    q = conv_net()
    rng = np.random.default_rng(0)
    shapes = {"input": q.input.shape, **{l.name: l.shape for l in q.layers}}
    for layer in q.layers[:3]:
        syn = layer.synapses[0]
        src = rng.integers(-128, 128, size=shapes[syn.source])
        matrix = conv_matrix(syn, tuple(src.shape), tuple(layer.shape))
        assert matrix.nnz == np.count_nonzero(matrix.toarray())
        np.testing.assert_array_equal(matrix @ src.ravel(),
                                      synapse_output(syn, src).ravel())


def test_what_lava_cannot_run_is_named():
    """lava_problems is the target's one validate for loihi2-sim: every violation named."""
    q = conv_net()
    conv2 = q.layers[1]
    shifted = replace(conv2, synapses=(replace(conv2.synapses[0], weight_exp=1),), depth=3)
    problems = [str(v) for v in
                lava_problems(replace(q, layers=(q.layers[0], shifted) + q.layers[2:]))]
    assert any("conv2<-conv1: conv weight_exp = 1" in p for p in problems)
    assert any("conv2: depth = 3" in p and "== 2 hops" in p for p in problems)
    assert lava_problems(q) == []


def test_a_file_lava_cannot_run_is_a_hardware_limit_error(tmp_path):
    """A loihi2 file with a conv weight exponent (fine on the chip, not in Lava's Conv):
    the runner refuses it with exit 3's error, naming the synapse."""
    from core.errors import HardwareLimitError
    q = conv_net()
    conv2 = q.layers[1]
    shifted = replace(conv2, synapses=(replace(conv2.synapses[0], weight_exp=1),))
    q = replace(q, layers=(q.layers[0], shifted) + q.layers[2:], target="loihi2")
    path = _export(q, tmp_path)
    with pytest.raises(HardwareLimitError, match="conv2<-conv1: conv weight_exp"):
        run_lava(path, encode_input(q.input, random_inputs(q, 1)))


def test_bad_input_is_refused(tmp_path):
    q = dense_chain()
    path = _export(q, tmp_path)
    with pytest.raises(InputError, match="shape"):
        run_lava(path, np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(InputError, match="8-bit"):
        run_lava(path, np.full((2, 12), 300, dtype=np.int64))


def test_input_stream_and_spike_packing():
    x = np.arange(2 * 3).reshape(2, 3)
    stream = input_stream(x, timesteps=2, period=4)
    assert stream.shape == (3, 8)
    np.testing.assert_array_equal(stream[:, :4], [[0, 0, 0, 0], [1, 1, 0, 0], [2, 2, 0, 0]])
    np.testing.assert_array_equal(stream[:, 4:6], [[3, 3], [4, 4], [5, 5]])
    bits = np.random.default_rng(0).integers(0, 2, size=(4, 101)).astype(bool)
    words = np.stack([pack_spikes(b, 3) for b in bits])
    assert words.max() < 2 ** 48
    np.testing.assert_array_equal(unpack_spikes(words.astype(np.float64).astype(np.int64),
                                                101), bits)
