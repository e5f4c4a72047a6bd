"""NIR export (exporters/nir_export.py): round trip through nir.read, and the graph plus its
metadata computes exactly what the float SNN simulator computes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nir  # noqa: E402  (a required dependency: requirements.txt)

from core.errors import InputError  # noqa: E402
from core.ir import evolve  # noqa: E402
from exporters.nir_export import to_nir, ungrouped, write_nir  # noqa: E402
from sims.torch_snn import run_network  # noqa: E402
from tests.qgraph_builders import mnist_like_snn, random_inputs, random_snn  # noqa: E402

GRAPHS = {f"{topo}-{'conv' if conv else 'dense'}-{seed}": (seed, topo, conv)
          for seed in (0, 1) for topo in ("chain", "branch", "skip") for conv in (True, False)}


def snn_of(key: str):
    seed, topo, conv = GRAPHS[key]
    return random_snn(seed, topology=topo, conv=conv, timesteps=5)


def assert_values_equal(a, b, where: str) -> None:
    """Field values equal after an HDF5 trip (arrays exactly, scalars by value)."""
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_values_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (np.ndarray, list, tuple)) or isinstance(b, np.ndarray):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)
    else:
        assert a == b, where


def assert_nir_equal(g, h) -> None:
    assert set(g.nodes) == set(h.nodes)
    assert sorted(g.edges) == sorted(h.edges)
    assert_values_equal(g.metadata, h.metadata, "graph.metadata")
    for name, node in g.nodes.items():
        other = h.nodes[name]
        assert type(node) is type(other), name
        a, b = node.to_dict(), other.to_dict()
        assert set(a) == set(b), name
        for key in a:
            assert_values_equal(a[key], b[key], f"{name}.{key}")


@pytest.mark.parametrize("key", sorted(GRAPHS))
def test_round_trip_through_nir_read(tmp_path, key):
    snn = snn_of(key)
    path = tmp_path / "network.nir"
    write_nir(snn, path)
    assert [p.name for p in tmp_path.iterdir()] == ["network.nir"]
    assert_nir_equal(to_nir(snn), nir.read(path))


def test_file_is_deterministic(tmp_path):
    snn = mnist_like_snn(0, 4)
    write_nir(snn, tmp_path / "a.nir")
    write_nir(snn, tmp_path / "b.nir")
    assert (tmp_path / "a.nir").read_bytes() == (tmp_path / "b.nir").read_bytes()


def test_node_types_and_edges():
    g = to_nir(random_snn(0, topology="branch", conv=True, timesteps=3))
    kinds = {k: type(v).__name__ for k, v in g.nodes.items()}
    assert kinds["input"] == "Input" and kinds["output"] == "Output"
    assert kinds["l1"] == kinds["l2"] == kinds["l3"] == "IF" and kinds["out"] == "I"
    assert kinds["l1.syn0"] == "Conv2d" and kinds["l3.syn0"] == "Affine"
    assert ("l3.syn0", "l3") in g.edges and ("l3.syn1", "l3") in g.edges   # two into one
    assert g.nodes["l3"].metadata["reset"] == "subtract"
    assert g.nodes["l3"].metadata["bias_schedule"].shape == (3, g.nodes["l3"].r.shape[0])


def test_ungrouped_kernel_is_the_same_conv():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 2, 3, 3))
    x = torch.from_numpy(rng.normal(size=(1, 4, 5, 5)))
    grouped = F.conv2d(x, torch.from_numpy(w), groups=2)
    full = F.conv2d(x, torch.from_numpy(ungrouped(w, 2)))
    torch.testing.assert_close(grouped, full, rtol=0, atol=1e-12)


def test_refuses_unnormalised_graph():
    snn = random_snn(0)
    layer = evolve(snn.layers[0], threshold=np.full(snn.layers[0].channels, 2.0))
    with pytest.raises(InputError, match="normalise"):
        to_nir(evolve(snn, layers=(layer,) + snn.layers[1:]))


# ----------------------------------------------------------------- NIR semantics + metadata

def topological(g) -> list[str]:
    order, done = [], set()
    while len(order) < len(g.nodes):
        for name in sorted(g.nodes):
            preds = [a for a, b in g.edges if b == name]
            if name not in done and all(p in done for p in preds):
                order.append(name)
                done.add(name)
    return order


def node_output(node, inputs: list[torch.Tensor], state: dict, name: str, t: int):
    """One step of one node, our discrete-time reading of NIR plus the ftbc metadata."""
    kind = type(node).__name__
    if kind == "Conv2d":
        return F.conv2d(inputs[0], torch.from_numpy(node.weight), torch.from_numpy(node.bias),
                        tuple(node.stride), tuple(node.padding), tuple(node.dilation))
    if kind == "Affine":
        return inputs[0] @ torch.from_numpy(node.weight).T + torch.from_numpy(node.bias)
    if kind == "Flatten":
        return inputs[0].reshape(inputs[0].shape[0], -1)
    if kind in ("IF", "I"):
        meta = node.metadata
        sched = torch.from_numpy(meta["bias_schedule"][t]).reshape((-1,) + (1,) * (node.r.ndim - 1))
        v = state[name] + torch.from_numpy(node.r) * sum(inputs) + sched
        if kind == "I":
            state[name] = v
            return v
        thr = torch.from_numpy(node.v_threshold)
        s = (v >= thr).to(v.dtype)
        state[name] = v - thr * s
        return s
    return inputs[0]


def run_nir(g, x: np.ndarray, timesteps: int) -> torch.Tensor:
    """(T, N, K) readout of the NIR graph, simulated from its nodes and metadata."""
    meta_in = g.nodes["input"].metadata
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    if "mean" in meta_in:
        chan = (1, -1) + (1,) * (xt.dim() - 2)
        xt = (xt - torch.from_numpy(meta_in["mean"]).reshape(chan)) / torch.from_numpy(
            meta_in["std"]).reshape(chan)
    order, state, out = topological(g), {}, []
    for name in order:
        node = g.nodes[name]
        if type(node).__name__ in ("IF", "I"):
            v0 = torch.from_numpy(node.metadata["v_init"]).reshape((-1,) + (1,) * (node.r.ndim - 1))
            thr = torch.from_numpy(node.v_threshold) if hasattr(node, "v_threshold") else 1.0
            state[name] = (v0 * thr).expand(len(x), *node.r.shape).clone()
    for t in range(timesteps):
        values = {"input": xt}
        for name in order[1:] if order[0] == "input" else order:
            if name == "input":
                continue
            preds = [values[a] for a, b in g.edges if b == name]
            values[name] = node_output(g.nodes[name], preds, state, name, t)
        out.append(values["output"])
    return torch.stack(out)


@pytest.mark.parametrize("key", ["chain-conv-0", "branch-conv-1", "skip-dense-0"])
def test_nir_graph_with_metadata_computes_the_snn(tmp_path, key):
    snn = snn_of(key)
    write_nir(snn, tmp_path / "n.nir")
    x = random_inputs(3, snn, 6)
    got = run_nir(nir.read(tmp_path / "n.nir"), x, snn.timesteps)
    want = run_network(snn, x, dtype=torch.float64).readout
    torch.testing.assert_close(got, want.to(torch.float64), rtol=1e-9, atol=1e-9)
