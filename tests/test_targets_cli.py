"""The loihi2 and nir targets through the command line (real files, read back)."""
from __future__ import annotations

import json

import nir
import numpy as np

from tests.test_cli import DIGITS_MODEL, FAST
from toolchain.cli import main


def test_loihi2_writes_netlist_and_summary(tmp_path, capsys):
    out = tmp_path / "l2"
    assert main([str(DIGITS_MODEL), "--target", "loihi2", "--out", str(out), *FAST]) == 0
    netlist = json.loads((out / "netlist.json").read_text())
    report = json.loads((out / "report.json").read_text())
    names = [layer["name"] for layer in netlist["layers"]]
    assert names == list(report["quantization"]["layers"])
    assert netlist["totals"]["cores"] >= len(names)
    assert report["netlist"]["activity"]["synops"] > 0
    assert "netlist (loihi2)" in capsys.readouterr().out
    assert "lava" not in report  # loihi2 is not simulated


def test_nir_target_round_trips_through_nir_read(tmp_path):
    out = tmp_path / "nir"
    assert main([str(DIGITS_MODEL), "--target", "nir", "--out", str(out), *FAST]) == 0
    graph = nir.read(out / "network.nir")
    report = json.loads((out / "report.json").read_text())
    assert report["network"] == "network.nir" and "fixed_accuracy" not in report
    if_nodes = [n for n in graph.nodes.values() if isinstance(n, nir.IF)]
    assert len(if_nodes) == 4  # the digits model's four spiking layers
    assert all(np.all(n.v_threshold == 1.0) for n in if_nodes)
    assert all(n.metadata["bias_schedule"].shape[0] == 4 for n in if_nodes)
