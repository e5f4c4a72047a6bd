"""netx HDF5 export: exact round trip, determinism, netx conventions, corrupt files."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from tests.lava_builders import conv_net, dense_chain, edge_chain, residual_net

from core.errors import InputError
from core.ir import graphs_equal
from exporters.netx import netx_bias, netx_chain, read_netx, validate_graph, write_netx

BUILDERS = {"dense": dense_chain, "conv": conv_net, "residual": residual_net,
            "edge": edge_chain, "skip": lambda: residual_net(same_depth=False)}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=sorted(BUILDERS))
def graph(request):
    return BUILDERS[request.param]()


def test_round_trip_is_exact(graph, tmp_path):
    path = tmp_path / "net.net"
    write_netx(graph, path)
    back = read_netx(path)
    assert graphs_equal(graph, back)
    assert back.meta["scales"].dtype == np.float64
    assert back.meta["stats"]["hist"].dtype == np.int64
    assert [p.name for p in tmp_path.iterdir()] == ["net.net"]   # no temp file left
    assert path.stat().st_mode & 0o044   # umask permissions, not a private temp file's


def test_same_graph_same_bytes_across_processes(tmp_path):
    write_netx(conv_net(), tmp_path / "a.net")
    write_netx(conv_net(), tmp_path / "b.net")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from tests.lava_builders import conv_net;"
            "from exporters.netx import write_netx; write_netx(conv_net(), sys.argv[2])")
    subprocess.run([sys.executable, "-c", code, str(ROOT), str(tmp_path / "c.net")],
                   check=True)
    data = [(tmp_path / f"{n}.net").read_bytes() for n in "abc"]
    assert data[0] == data[1] == data[2]


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "net.net"
    write_netx(dense_chain(), path)
    before = path.read_bytes()
    bad = replace(dense_chain(), meta={"oops": object()})
    with pytest.raises(InputError, match="oops"):
        write_netx(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["net.net"]


def test_export_refuses_a_graph_lava_cannot_hold(tmp_path):
    from tests.qgraph_builders import random_qgraph
    with pytest.raises(InputError, match="cannot export"):
        write_netx(random_qgraph(1, stress=True), tmp_path / "net.net")
    assert list(tmp_path.iterdir()) == []


def test_quantized_graph_round_trip(tmp_path):
    from tests.qgraph_builders import random_qgraph
    q = random_qgraph(2, topology="branch")
    write_netx(q, tmp_path / "net.net")
    assert graphs_equal(read_netx(tmp_path / "net.net"), q)


def test_netx_network_opens_with_our_conventions(tmp_path):
    """netx's own loader must see the same weights, shapes and thresholds (netx view)."""
    from lava.lib.dl.netx import hdf5

    from sims.lava_runner import lava_conv_weight
    q = conv_net()
    write_netx(q, tmp_path / "net.net")
    net = hdf5.Network(net_config=str(tmp_path / "net.net"), input_message_bits=8)
    assert len(net.layers) == len(q.layers)
    for block, layer in zip(net.layers, q.layers):
        syn = layer.synapses[0]
        shape = layer.shape[::-1] if len(layer.shape) == 3 else layer.shape
        assert tuple(block.shape) == tuple(shape)                   # (W, H, C)
        assert block.neuron.du.init == 4095 and block.neuron.dv.init == 0
        want_vth = (1 << 17) - 1 if layer.readout else int(np.median(layer.vth)) >> 6
        assert block.neuron.vth.init == want_vth
        bias = np.asarray(block.neuron.bias_mant.init)                # (W, H, C) or (F,)
        np.testing.assert_array_equal(bias.reshape(-1, layer.shape[0])[0]
                                      if bias.ndim > 1 else bias, netx_bias(layer))
        assert block.neuron.bias_exp.init == 6
        if syn.kind == "conv":
            np.testing.assert_array_equal(block.synapse.weight.init,
                                          lava_conv_weight(syn.weight))
            assert tuple(block.synapse.stride.init) == syn.stride[::-1]
            assert tuple(block.synapse.padding.init) == syn.padding[::-1]
            assert tuple(block.synapse.dilation.init) == syn.dilation[::-1]
            assert block.synapse.groups.init == syn.groups
        else:
            exp = block.synapse.proc_params["weight_exp"]
            effective = np.right_shift(block.synapse.weights.init.astype(np.int64), -exp)
            np.testing.assert_array_equal(effective, syn.weight)


def test_netx_view_of_residual_is_the_chain_prefix(tmp_path):
    from lava.lib.dl.netx import hdf5
    q = residual_net()
    write_netx(q, tmp_path / "net.net")
    assert [layer.name for layer in netx_chain(q)] == ["a"]
    net = hdf5.Network(net_config=str(tmp_path / "net.net"), input_message_bits=8)
    assert len(net.layers) == 1


def test_synaptic_delays_are_stored_checked_and_load_in_netx(tmp_path):
    """The skip net's shortcut a -> c waits one step: the file says so per synapse, with
    each layer's depth; the graph comes back identical; lava-dl netx opens the file (its
    view is the chain before the residual layer, so it never sees a delay to clamp); a file
    whose delay disagrees with the graph's depths is refused, naming the dataset."""
    from lava.lib.dl.netx import hdf5
    q = residual_net(same_depth=False)
    path = tmp_path / "net.net"
    write_netx(q, path)
    with h5py.File(path, "r") as f:
        assert [int(f[f"ftbc/layers/{i}/depth"][()]) for i in range(4)] == [1, 2, 3, 4]
        assert [int(f[f"ftbc/layers/2/synapses/{k}/delay"][()]) for k in (0, 1)] == [1, 0]
        assert int(f["ftbc/layers/1/synapses/0/delay"][()]) == 0
        assert int(f["ftbc/version"][()]) == 2
    assert graphs_equal(read_netx(path), q)
    bad = tmp_path / "bad.net"
    bad.write_bytes(path.read_bytes())
    _corrupt(bad, lambda f: f["ftbc/layers/2/synapses/0/delay"].__setitem__((), 0))
    with pytest.raises(InputError, match="layers/2/synapses/0/delay is 0, but layer c's "
                                         "sources need 1"):
        read_netx(bad)
    net = hdf5.Network(net_config=str(path), input_message_bits=8)
    assert len(net.layers) == len(netx_chain(q)) == 2


def test_a_delay_beyond_the_targets_field_is_refused(tmp_path, monkeypatch):
    """A target whose delay field holds 0 steps cannot take the skip net: the exporter
    refuses it naming the synapse, nothing is written."""
    import hw_targets.base
    from hw_targets import get_target
    narrow = replace(get_target("loihi2"), name="narrow", max_synaptic_delay=0)
    monkeypatch.setitem(hw_targets.base.TARGETS, "narrow", narrow)
    q = replace(residual_net(same_depth=False), target="narrow")
    with pytest.raises(InputError, match=r"c<-a: synaptic delay = 1\.0 exceeds 0 steps"):
        write_netx(q, tmp_path / "net.net")
    assert list(tmp_path.iterdir()) == []


def _corrupt(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.__delitem__("ftbc/layers/1"), "missing group"),
    (lambda f: f.__delitem__("ftbc/input"), "missing group /ftbc/input"),
    (lambda f: f.__delitem__("ftbc/layers/0/vth"), "missing /ftbc/layers/0/vth"),
    (lambda f: (f.__delitem__("ftbc/layers/2/bias_mant"),
                f.create_dataset("ftbc/layers/2/bias_mant", data=np.zeros((3, 4), np.int32))),
     r"bias_mant has shape \(3, 4\)"),
    (lambda f: (f.__delitem__("ftbc/layers/0/v_init"),
                f.create_dataset("ftbc/layers/0/v_init", data=np.zeros(4))),
     "v_init must be a 1-d integer array"),
    (lambda f: f["ftbc/layers/3/synapses/0/source"].__setitem__((), b"nope"),
     "source 'nope'"),
    (lambda f: f["ftbc/neuron/compare"].__setitem__((), b">"), "compare"),
    (lambda f: f["ftbc/format"].__setitem__((), b"other-fmt"), "ftbc/format"),
])
def test_corrupt_file_raises_one_line_input_error(tmp_path, edit, message):
    path = tmp_path / "net.net"
    write_netx(conv_net(), path)
    _corrupt(path, edit)
    with pytest.raises(InputError, match=message) as info:
        read_netx(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_missing_and_foreign_files(tmp_path):
    path = tmp_path / "net.net"
    write_netx(conv_net(), path)
    data = path.read_bytes()
    (tmp_path / "cut.net").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.net").write_text("not hdf5")
    with h5py.File(tmp_path / "plain.net", "w") as f:
        f.create_group("layer")
    for name, message in [("cut.net", "not a readable HDF5|corrupt"),
                          ("text.net", "not a readable HDF5"), ("absent.net", "not a readable"),
                          ("plain.net", "missing group /ftbc")]:
        with pytest.raises(InputError, match=message) as info:
            read_netx(tmp_path / name)
        assert "\n" not in str(info.value)


def test_validate_graph_names_each_problem():
    q = dense_chain()
    layer = q.layers[1]
    odd = np.array(layer.synapses[0].weight)
    odd[0, 0] = 3
    bad = replace(layer, synapses=(replace(layer.synapses[0], weight=odd),), vth=np.zeros_like(layer.vth),
                  depth=0)
    problems = validate_graph(replace(q, layers=(q.layers[0], bad) + q.layers[2:]))
    # the target's limits, from exporters.quantize.validate (the one check), each named
    assert any("fc2<-fc1: odd weights = 1" in p for p in problems)
    assert any("fc2: vth = 0" in p for p in problems)
    assert any("fc2: depth = 0" in p and "== 2 hops" in p for p in problems)
    structural = replace(bad, bias_mant=np.zeros((2, 10), np.int64))
    problems = validate_graph(replace(q, layers=(q.layers[0], structural) + q.layers[2:]))
    assert problems == ["layer fc2: bias_mant has shape (2, 10), expected (6, 10)"]


def test_exporter_imports_neither_torch_nor_sims():
    code = ("import sys, exporters.netx; bad = [m for m in sys.modules if m == 'torch' or "
            "m.startswith(('torch.', 'sims', 'lava'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_limits_are_the_targets():
    """The weight exponent range is the target's (-8..7 for Loihi 2), not a format guess."""
    from hw_targets import get_target
    q = dense_chain()
    t = get_target(q.target)
    layer = q.layers[1]
    for exp, ok in ((t.weight_exp_max, True), (t.weight_exp_max + 1, False),
                    (t.weight_exp_min, True), (t.weight_exp_min - 1, False)):
        syn = replace(layer.synapses[0], weight_exp=exp)
        problems = validate_graph(replace(q, layers=(q.layers[0], replace(layer, synapses=(syn,)))
                                          + q.layers[2:]))
        assert (not any("weight_exp" in p for p in problems)) == ok, (exp, problems)
    assert any(f"exceeds [{t.weight_exp_min}, {t.weight_exp_max}]" in p for p in problems)
