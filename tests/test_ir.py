"""core.ir: a synapse's kind is a SynapseKind, stored in files as its string value."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from core.ir import QSynapse, Synapse, SynapseKind, frozen_array
from exporters.netx import read_netx, write_netx
from tests.qgraph_builders import random_qgraph


@pytest.mark.parametrize("cls", [Synapse, QSynapse])
def test_kind_given_as_string_becomes_the_member(cls) -> None:
    syn = cls("input", "dense", frozen_array(np.zeros((2, 3))))
    assert syn.kind is SynapseKind.DENSE and syn.kind == "dense"
    assert cls("input", SynapseKind.CONV, frozen_array(np.zeros((2, 1, 3, 3)))).kind \
        is SynapseKind.CONV
    assert json.dumps(syn.kind) == '"dense"' and f"{syn.kind}" == "dense"
    with pytest.raises(ValueError, match="pool"):
        cls("input", "pool", frozen_array(np.zeros((2, 3))))


def test_netx_stores_the_value_and_reads_back_members(tmp_path) -> None:
    q = random_qgraph(3, conv=True)
    write_netx(q, tmp_path / "net.net")
    back = read_netx(tmp_path / "net.net")
    kinds = [s.kind for layer in back.layers for s in layer.synapses]
    assert set(kinds) == {SynapseKind.CONV, SynapseKind.DENSE}
    assert all(type(k) is SynapseKind for k in kinds)
    with h5py.File(tmp_path / "net.net", "r") as f:
        stored = {bytes(ds[()]) for name, ds in _datasets(f) if "/synapses/" in name and name.endswith("/kind")}
    assert stored == {b"conv", b"dense"}


def _datasets(f: h5py.File) -> list:
    out = []
    f.visititems(lambda name, obj: out.append((name, obj)) if isinstance(obj, h5py.Dataset)
                 else None)
    return out
