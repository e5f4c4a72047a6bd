"""Data-parallel runs (issue 8): two real ranks under torchrun on loopback (127.0.0.1, gloo)
against a single process, and a rank that fails, is killed or hangs.

Every run here is the real CLI (``tests/dist_entry.py`` wraps ``toolchain.cli.main`` with a
schedule dump and fault injection) in real processes; nothing is mocked."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core import distributed

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "examples" / "digits_cnn.pt"
# Uneven shards on purpose: 101 evaluation samples, calibration batches of 45 (23 + 22),
# 113 threshold samples in chunks of 256 (rank 1 has no forward chunk at all).
# T = 3: at T = 4 the plain conversion already agreed with the ANN on all 23 held-out samples at
# every step, and FTBC (ideal-neuron step targets, fewer spikes at step 1) lost one sample-step
# of 92, so the guard reverted it and the schedules compared below were all zero
SETTINGS = ["--timesteps", "3", "--eval-samples", "101", "--verify-samples", "3",
            "--calib-batches", "2", "--calib-batch-size", "45", "--iterations", "2",
            "--no-progress"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONUNBUFFERED": "1", **extra}


def run_ranks(ranks: int, out: Path, *args: str, timeout: float = 600,
              **env: str) -> subprocess.CompletedProcess:
    """``tests/dist_entry.py`` on ``ranks`` processes (torchrun on 127.0.0.1), or plainly
    when ``ranks`` is 1 (no launcher: the single-process path)."""
    entry = [str(ROOT / "tests" / "dist_entry.py"), str(DIGITS_MODEL), "--target",
             "loihi2-sim", "--out", str(out), *SETTINGS, *args]
    if ranks == 1:
        cmd = [sys.executable, *entry]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "--monitor-interval", "0.2", *entry]
    return subprocess.run(cmd, cwd=ROOT, env=_env(PYTHONPATH=str(ROOT), **env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single_and_pair(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    runs = {}
    for ranks in (1, 2):
        out = base / f"ranks{ranks}"
        proc = run_ranks(ranks, out, FTBC_TEST_DUMP=str(base / f"sched{ranks}.npz"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[ranks] = (out, np.load(base / f"sched{ranks}.npz"), proc)
    return runs


def test_two_ranks_write_the_same_network(single_and_pair):
    (out1, _, _), (out2, _, _) = single_and_pair[1], single_and_pair[2]
    assert (out1 / "network.net").read_bytes() == (out2 / "network.net").read_bytes()
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in out1.iterdir())


def test_two_ranks_bias_schedules_match(single_and_pair):
    (_, s1, _), (_, s2, _) = single_and_pair[1], single_and_pair[2]
    assert sorted(s1.files) == sorted(s2.files) and len(s1.files) > 0
    for key in s1.files:
        np.testing.assert_allclose(s2[key], s1[key], rtol=1e-6, atol=1e-6 * np.abs(
            s1[key]).max(initial=0.0), err_msg=key)
    assert any(np.abs(s1[k]).max() > 0 for k in s1.files if k.startswith("ftbc/"))


def test_two_ranks_report_the_same_results(single_and_pair):
    r1, r2 = (json.loads((single_and_pair[k][0] / "report.json").read_text()) for k in (1, 2))
    for key in ("ann_accuracy", "snn_accuracy", "fixed_accuracy", "snn_agreement",
                "fixed_agreement", "saturations"):
        assert r2[key] == r1[key], key
    assert r2["lava"]["samples"] == 3 and r2["lava"]["spike_mismatches"] == 0
    assert r2["lava"]["accuracy"] == r1["lava"]["accuracy"]
    assert r2["netlist"]["activity"] == r1["netlist"]["activity"] if "netlist" in r1 else True
    for method in ("lp", "ftbc"):
        l1, l2 = r1["calibration"][method]["layers"], r2["calibration"][method]["layers"]
        assert {k: v["kept"] for k, v in l2.items()} == {k: v["kept"] for k, v in l1.items()}
        for name in l1:
            for key in ("holdout_error_before", "holdout_error_after"):
                assert l2[name][key] == pytest.approx(l1[name][key], rel=1e-9)
    assert r2["quantization"] == r1["quantization"]


def test_two_nodes_write_the_same_network(single_and_pair, tmp_path):
    """The README's multi-node launch, both "machines" on this one: two torchrun agents
    (``--nnodes 2 --node-rank 0/1``, one process each) meeting at 127.0.0.1."""
    out, port = tmp_path / "out", str(_free_port())
    entry = [str(ROOT / "tests" / "dist_entry.py"), str(DIGITS_MODEL), "--target",
             "loihi2-sim", "--out", str(out), *SETTINGS]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
         port, *entry], cwd=ROOT, env=_env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert results[0][0].count("outputs in ") == 1 and "outputs in " not in results[1][0]
    single = single_and_pair[1][0]
    assert (out / "network.net").read_bytes() == (single / "network.net").read_bytes()


def test_two_ranks_solve_the_same_network(tmp_path):
    """``--ftbc-fit solve``: every rank bisects on the rates of all ranks' shards (exact
    counts, all-reduced), so the ranks agree on every step and two write what one writes."""
    reports = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        proc = run_ranks(ranks, out, "--ftbc-fit", "solve", "--no-baselines",
                         "--verify-samples", "0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        reports[ranks] = json.loads((out / "report.json").read_text())
    assert ((tmp_path / "ranks1" / "network.net").read_bytes()
            == (tmp_path / "ranks2" / "network.net").read_bytes())
    ftbc = reports[2]["calibration"]["ftbc"]
    assert ftbc["fit"] == "solve" and not ftbc["holdout"]["reverted"]
    assert any(entry["kept"] for entry in ftbc["layers"].values())  # not all zeros
    assert reports[2]["fixed_accuracy"] == reports[1]["fixed_accuracy"]


def test_two_ranks_select_the_same_threshold_scale(tmp_path):
    """Several --threshold-scale values: each rank scores its shard of the selection images
    and the scores are gathered, so two ranks score, choose and write what one does."""
    reports = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        proc = run_ranks(ranks, out, "--threshold-scale", "1", "1.3", "--no-baselines",
                         "--verify-samples", "0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "report.json").read_text())
        reports[ranks] = report["selection"]
    assert reports[2]["chosen"] == reports[1]["chosen"]
    assert reports[2]["divergence"] == pytest.approx(reports[1]["divergence"], rel=1e-9)
    assert ((tmp_path / "ranks1" / "network.net").read_bytes()
            == (tmp_path / "ranks2" / "network.net").read_bytes())


def test_only_rank_zero_speaks_and_writes(single_and_pair):
    _, _, proc = single_and_pair[2]
    assert proc.stdout.count("outputs in ") == 1
    out = single_and_pair[2][0]
    assert not [p for p in out.iterdir() if p.name.startswith(".ftbc-staging")]


def _previous_outputs(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"previous": true}')
    (out / "network.net").write_bytes(b"previous network")
    return out, {p.name: p.read_bytes() for p in out.iterdir()}


@pytest.mark.parametrize("kind, stage", [("raise", "calibrate"), ("kill", "calibrate"),
                                         ("kill", "emulate")])
def test_failed_rank_stops_every_rank_and_is_named(tmp_path, kind, stage):
    out, before = _previous_outputs(tmp_path)
    start = time.monotonic()
    proc = run_ranks(2, out, timeout=300, FTBC_TEST_FAULT=f"1:{stage}:{kind}")
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    assert "rank: 1" in proc.stderr  # torchrun's failure summary names the failed rank
    if kind == "raise":  # rank 1 says why; rank 0 names it with the reason
        reason = f"internal error: RuntimeError: injected failure in {stage}"
        assert f"ftbc-export[rank 1/2]: {reason}" in proc.stderr
        assert "ftbc-export[rank 0/2]: error: lost the other ranks of this torchrun job: " \
               f"rank 1 stopped with {reason}" in proc.stderr, proc.stderr[-3000:]
    else:
        assert "exitcode  : -9" in proc.stderr, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written


def test_hanging_rank_times_out_with_a_clear_error(tmp_path):
    """Rank 1 stops answering before convert's collective: rank 0 gives up after
    --dist-timeout (exit 5, the message says why), then torchrun stops rank 1."""
    out, before = _previous_outputs(tmp_path)
    start = time.monotonic()
    proc = run_ranks(2, out, "--dist-timeout", "5", timeout=300,
                     FTBC_TEST_FAULT="1:convert:hang")
    assert proc.returncode != 0
    assert time.monotonic() - start < 120
    assert "ftbc-export[rank 0/2]: error: lost the other ranks of this torchrun job" \
        in proc.stderr, proc.stderr[-3000:]
    assert "rank: 0" in proc.stderr and "exitcode: 5" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_fewer_samples_than_ranks_is_a_clear_error(tmp_path):
    proc = run_ranks(2, tmp_path / "out", "--eval-samples", "1", timeout=300)
    assert proc.returncode != 0 and "exitcode  : 2" in proc.stderr
    for r in (0, 1):
        assert f"ftbc-export[rank {r}/2]: error: the evaluation set has 1 sample(s), fewer " \
               "than the 2 ranks of this torchrun job; raise --eval-samples or start fewer " \
               "ranks" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n, world, align", [(10, 2, 1), (11, 2, 1), (1, 2, 1), (0, 3, 1),
                                             (113, 2, 256), (600, 2, 256), (7, 3, 2)])
def test_shards_cover_every_row_once_in_order(monkeypatch, n, world, align):
    parts = []
    for r in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        parts.append(distributed.shard(n, align))
    rows = [i for s in parts for i in range(n)[s]]
    assert rows == list(range(n))
    assert all(s.start % align == 0 for s in parts if s.start < n)


def test_single_process_needs_no_process_group():
    distributed.init_from_env()
    import torch.distributed as dist
    assert not dist.is_initialized() and distributed.world_size() == 1
    x = np.arange(6.0)
    assert distributed.gather_array(x) is x


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float64])
def test_rate_counts_exactly(dtype):
    rng = np.random.default_rng(0)
    ones = rng.random((3, 5, 700)) < 0.37
    x = torch.from_numpy(ones).to(dtype)
    want = ones.sum((0, 2)) / (3 * 700)
    got = distributed.rate(x, (0, 2))
    assert got.dtype == torch.float64
    np.testing.assert_array_equal(got.numpy(), want)
    assert float(distributed.rate(x)) == ones.mean()
    np.testing.assert_array_equal(distributed.rate(x, ()).numpy(), ones)  # over no dimension
    np.testing.assert_array_equal(distributed.mean(torch.from_numpy(ones), (0, 2)).numpy(), want)


def test_rate_counts_beyond_float32_integers_exactly():
    # a float32 sum of 2**24 + 3 ones gives 2**24 + 4; the count must not
    x = torch.ones((2, 2 ** 23 + 1, 1))
    x[1, 0, 0] = 0.0
    n = 2 * (2 ** 23 + 1)
    assert float(distributed.rate(x, (0, 1))[0]) == (n - 1) / n
