"""The signed neuron in Lava (real Loihi2SimCfg runs, no mocks) and in the netx file.

Each network gets a bias schedule that drives its signed layers up early and pulls them
below 0 late (``push_then_pull``), so they send -1 spikes, which must reach the next
layer through Dense, Sparse, Conv and DelaySparse as graded payloads: Lava's spikes and
readout equal the integer reference's spike for spike. Small networks, few samples."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from core.errors import InputError
from core.ir import QLayer, QuantGraph, evolve, graphs_equal
from exporters.netx import NEURON_IF, NEURON_SIGNED, netx_chain, read_netx, write_netx
from hw_targets.timing import synaptic_delays
from sims.lava_runner import message_bits, run_lava, unpack_spikes
from sims.reference import encode_input, reference_run
from tests.lava_builders import conv_net, dense_chain, random_inputs, residual_net

SAMPLES = 2


def push_then_pull(layer: QLayer, timesteps: int) -> QLayer:
    """``layer`` signed, its bias schedule raised by 3/4 of each channel's threshold per step
    over the first half of the steps and lowered by 3/2 of it over the rest (mantissas at
    the layer's bias_exp): it fires early, then its membrane goes below 0 while its net
    count is positive, where the signed neuron sends -1."""
    vth = np.asarray(layer.vth, dtype=np.int64)
    push, pull = (3 * vth // 4) >> layer.bias_exp, -((3 * vth // 2) >> layer.bias_exp)
    late = np.arange(timesteps)[:, None] >= timesteps // 2
    bias = np.asarray(layer.bias_mant, dtype=np.int64) + np.where(late, pull, push)
    return evolve(layer, signed=True, bias_mant=bias.astype(layer.bias_mant.dtype))


def signed_graph(q: QuantGraph, names: tuple[str, ...] | None = None) -> QuantGraph:
    """``q`` with the layers ``names`` (default: every spiking layer) made signed and
    pushed then pulled."""
    return evolve(q, layers=tuple(
        push_then_pull(layer, q.timesteps)
        if not layer.readout and (names is None or layer.name in names) else layer
        for layer in q.layers))


def _export(q: QuantGraph, tmp_path) -> str:
    path = tmp_path / "net.net"
    write_netx(q, path)
    return str(path)


def reference_outputs(q: QuantGraph, x_int: np.ndarray
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The reference, sample by sample, stacked as (T, N, n): int8 spikes for signed
    layers, uint8 for IF layers (``LavaResult``'s dtypes), the readout int64."""
    runs = [reference_run(q, x_int[k]) for k in range(x_int.shape[0])]
    spikes = {layer.name: np.stack([r[layer.name] for r in runs], axis=1).astype(
        np.int8 if layer.signed else np.uint8) for layer in q.layers if not layer.readout}
    readout = np.stack([r[q.readout.name] for r in runs], axis=1).astype(np.int64)
    return spikes, readout


def assert_lava_equals_reference(q: QuantGraph, path: str, x_int: np.ndarray,
                                 **kwargs) -> dict[str, np.ndarray]:
    """Lava's spikes (dtype included) and readout equal the reference's; every signed
    layer sent -1 spikes. Returns Lava's spikes."""
    result = run_lava(path, x_int, **kwargs)
    spikes, readout = reference_outputs(q, x_int)
    assert set(result.spikes) == set(spikes)
    for layer in q.layers:
        if layer.readout:
            continue
        got = result.spikes[layer.name]
        assert got.dtype == (np.int8 if layer.signed else np.uint8), layer.name
        np.testing.assert_array_equal(got, spikes[layer.name], err_msg=layer.name)
        if layer.signed:
            assert (got == -1).any() and (got == 1).any(), f"{layer.name} sent no -1"
    assert result.readout.dtype == np.int64
    np.testing.assert_array_equal(result.readout, readout)
    return result.spikes


@pytest.mark.lava
def test_signed_dense_chain(tmp_path):
    """Dense synapses from signed layers (num_message_bits 2): fc1 -> fc2 -> readout."""
    q = signed_graph(dense_chain(steps=6))
    assert [message_bits(q, s.source) for l in q.layers for s in l.synapses] == [8, 2, 2]
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    assert_lava_equals_reference(q, _export(q, tmp_path), x_int)


@pytest.mark.lava
@pytest.mark.parametrize("pixels", [0, 1 << 20], ids=["conv", "sparse"])
def test_signed_conv_layers(pixels, tmp_path, monkeypatch):
    """Signed conv layers read by Lava's Conv, then by their exact Sparse matrices: the -1
    payloads are convolved exactly either way (stride, padding, dilation, groups)."""
    import sims.lava_runner
    monkeypatch.setattr(sims.lava_runner, "SPARSE_CONV_MAX_PIXELS", pixels)
    q = signed_graph(conv_net(steps=4))
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    assert_lava_equals_reference(q, _export(q, tmp_path), x_int)


@pytest.mark.lava
def test_signed_residual_with_a_delayed_shortcut(tmp_path):
    """The skip net c = f(a -> c delayed 1 step, b(a) -> c) with a and c signed, b IF: the
    signed shortcut runs as a DelaySparse with graded messages, b's IF spikes as a binary
    Dense into the same sum, and the signed c feeds the readout."""
    q = signed_graph(residual_net(steps=4, same_depth=False), names=("a", "c"))
    assert synaptic_delays(q.layers)["c"] == (1, 0)
    assert [message_bits(q, s.source) for s in q.layer("c").synapses] == [2, 0]
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    spikes = assert_lava_equals_reference(q, _export(q, tmp_path), x_int)
    assert spikes["b"].any()


@pytest.mark.lava
def test_signed_floating_pt_model(tmp_path):
    """Lava's float models (weight_exp 0 everywhere) compute the same signed spikes."""
    q = signed_graph(dense_chain(seed=2, steps=6))
    assert all(s.weight_exp == 0 for l in q.layers for s in l.synapses)
    x_int = encode_input(q.input, random_inputs(q, SAMPLES))
    assert_lava_equals_reference(q, _export(q, tmp_path), x_int, select_tag="floating_pt")


def test_netx_round_trip_keeps_signed_and_ends_the_netx_view(tmp_path):
    """``layers/<i>/signed`` is written for signed layers only and read back; the file's
    neuron kind names the signed neuron; the lava-dl view stops before the first signed
    layer (and lava-dl netx still opens the file)."""
    from lava.lib.dl.netx import hdf5
    q = signed_graph(dense_chain(sizes=(12, 16, 10, 8, 5)), names=("fc2",))
    path = tmp_path / "net.net"
    write_netx(q, path)
    back = read_netx(path)
    assert graphs_equal(back, q)
    assert [layer.signed for layer in back.layers] == [False, True, False, False]
    assert [layer.name for layer in netx_chain(q)] == ["fc1"]
    with h5py.File(path, "r") as f:
        assert ["signed" in f[f"ftbc/layers/{i}"] for i in range(4)] == [False, True,
                                                                          False, False]
        assert f["ftbc/neuron/kind"][()].decode() == NEURON_SIGNED
        assert int(f["ftbc/netx_layers"][()]) == 1
        assert len(f["layer"]) == 2                      # input + fc1
    net = hdf5.Network(net_config=str(path), input_message_bits=8)
    assert len(net.layers) == 1
    first = signed_graph(dense_chain(), names=("fc1",))
    write_netx(first, tmp_path / "first.net")
    assert netx_chain(first) == []
    assert read_netx(tmp_path / "first.net").layers[0].signed


def test_if_files_keep_their_neuron_kind_and_layout(tmp_path):
    q = dense_chain()
    write_netx(q, tmp_path / "net.net")
    with h5py.File(tmp_path / "net.net", "r") as f:
        assert f["ftbc/neuron/kind"][()].decode() == NEURON_IF
        assert not any("signed" in f[f"ftbc/layers/{i}"] for i in range(len(q.layers)))
    assert not any(layer.signed for layer in read_netx(tmp_path / "net.net").layers)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f["ftbc/neuron/kind"].__setitem__((), NEURON_IF.encode()),
     "neuron/kind is 'integrate-and-fire' but layers/1/signed is 1"),
    (lambda f: f["ftbc/neuron/kind"].__setitem__((), b"leaky"), "implements"),
    (lambda f: f["ftbc/layers/1"].__delitem__("signed"),
     "kind is 'integrate-and-fire\\+signed' but no layers/<i>/signed is 1"),
])
def test_a_file_whose_neuron_kind_disagrees_with_its_layers_is_refused(edit, message,
                                                                        tmp_path):
    path = tmp_path / "net.net"
    write_netx(signed_graph(dense_chain(), names=("fc2",)), path)
    with h5py.File(path, "r+") as f:
        edit(f)
    with pytest.raises(InputError, match=message):
        read_netx(path)


def test_a_signed_readout_is_refused(tmp_path):
    q = dense_chain()
    q = evolve(q, layers=q.layers[:-1] + (evolve(q.readout, signed=True),))
    with pytest.raises(InputError, match="layer fc3: is a signed readout"):
        write_netx(q, tmp_path / "net.net")


def test_signed_records_unpack_to_minus_one():
    """The signed model's two records (+1 and -1 spikes, 48 per word) give -1/0/1 back."""
    from sims.lava_procs.models import pack_spikes
    s = np.random.default_rng(0).integers(-1, 2, size=(3, 101))
    plus = np.stack([pack_spikes(row > 0, 3) for row in s]).astype(np.float64)
    minus = np.stack([pack_spikes(row < 0, 3) for row in s]).astype(np.float64)
    got = (unpack_spikes(plus.astype(np.int64), 101).astype(np.int8)
           - unpack_spikes(minus.astype(np.int64), 101).astype(np.int8))
    np.testing.assert_array_equal(got, s)
