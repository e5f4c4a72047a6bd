"""Streaming (memory bounded by the batch, not by T or the calibration set) changes no result:
the float SNN's time-chunked stream equals running the layers one after another over all T,
bit for bit; the calibrations give the same graphs with their spike cache on disk as in
memory, and with uncached, time-chunked integer drives; the stream holds the same number of
spike values whatever T (a structural bound, not a timing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import toolchain.calibrate_fixed as cf
import toolchain.calibration as calibration
from exporters.quantize import quantize
from hw_targets import get_target
from sims import engine
from sims import torch_snn
from sims.engine import FloatArithmetic
from tests.ann_builders import residual_graph
from toolchain.calibrate import calibrate
from toolchain.calibration import DiskTrain
from toolchain.convert import convert
from core.ir import graphs_equal
from toolchain.normalize import normalize

torch.set_num_threads(1)


def _layerwise(snn, x, dtype=torch.float32):
    """The float SNN as it ran before streaming: each layer over all T, in order."""
    plan = engine.compile(snn, FloatArithmetic(dtype))
    x_enc = torch_snn.encode_input(snn.input, x, dtype)
    trains = {}
    for lp in plan.layers:
        trains[lp.name] = torch_snn.layer_output(lp, x_enc, trains, snn.timesteps)
    return trains


@pytest.fixture(scope="module")
def residual():
    """A residual SNN (fan-out, a skip over two layers) with random bias schedules."""
    ann = residual_graph(seed=2, channels=6)
    x = np.random.default_rng(0).uniform(0, 1, (40, 1, 8, 8)).astype(np.float32)
    snn = convert(ann, x, timesteps=13)
    return ann, x, snn


@pytest.mark.parametrize("chunk", [1 << 23, 600, 2000])
def test_stream_equals_layer_by_layer_bit_for_bit(residual, monkeypatch, chunk):
    """Small FLOAT_CHUNK_ELEMENTS: every layer runs in many chunks of its own length (1 to
    several steps), consumers and sources out of step; spikes, totals and readout equal."""
    _, x, snn = residual
    monkeypatch.setattr(engine, "FLOAT_CHUNK_ELEMENTS", chunk)
    want = _layerwise(snn, x)
    run = torch_snn.run_network(snn, x, keep_spikes=True)
    readout = snn.layers[-1].name
    assert torch.equal(run.readout, want[readout])
    for name, s in run.spikes.items():
        assert torch.equal(s, want[name]), name
        assert run.spike_totals[name] == float(want[name].sum())
    plain = torch_snn.run_network(snn, x)
    assert torch.equal(plain.readout, want[readout]) and plain.spikes is None
    assert plain.spike_totals == run.spike_totals


def test_stream_from_a_middle_layer_with_given_trains(residual, monkeypatch):
    """``stream_readout`` (calibration's held-out readout): layers from ``start`` on, earlier
    trains given (cached ones read through ``DiskTrain``)."""
    _, x, snn = residual
    monkeypatch.setattr(engine, "FLOAT_CHUNK_ELEMENTS", 700)
    want = _layerwise(snn, x)
    plan = engine.compile(snn, FloatArithmetic(torch.float32))
    x_enc = torch_snn.encode_input(snn.input, x)
    names = [lp.name for lp in plan.layers]
    for start in range(1, len(names) - 1):
        given = {n: DiskTrain(want[n]) for n in names[:start]}
        got = torch_snn.stream_readout(plan, x_enc, snn.timesteps, given, start)
        assert torch.equal(got, want[names[-1]]), start


def test_stream_memory_does_not_grow_with_T(residual, monkeypatch):
    """The spike values the stream holds at once are the same for T = 16 and T = 256 (each
    layer keeps a few chunks, never its whole train); the layer-by-layer run held
    T x batch x neurons."""
    ann, x, _ = residual
    monkeypatch.setattr(engine, "FLOAT_CHUNK_ELEMENTS", 4000)
    peaks = {}
    for steps in (16, 256):
        snn = convert(ann, x, timesteps=steps)
        plan = engine.compile(snn, FloatArithmetic(torch.float32))
        stream = torch_snn._Stream(plan, torch_snn.encode_input(snn.input, x), steps)
        stream.readout()
        peaks[steps] = stream.peak_held
        whole = steps * len(x) * sum(lp.n for lp in plan.layers if not lp.readout)
        assert 0 < stream.peak_held < whole
    assert peaks[16] == peaks[256]


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
@pytest.mark.parametrize("shape", [(5, 3, 7), (9, 2, 4, 3, 3), (1, 1, 1)])
def test_disk_train_round_trip(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    train = (torch.rand(shape, generator=g) < 0.4).to(dtype)
    d = DiskTrain(train)
    assert d.shape == shape and len(d) == shape[0]
    assert torch.equal(d[:], train) and d[:].dtype == dtype
    chunked = DiskTrain(train[t0:t0 + 2].to(torch.float32 if dtype == torch.bool else dtype)
                        for t0 in range(0, shape[0], 2))
    assert torch.equal(chunked[:], train)
    for t0, t1 in ((0, 1), (1, 3), (shape[0] - 1, shape[0]), (2, 2)):
        assert torch.equal(d[t0:t1], train[t0:t1])
    with pytest.raises(TypeError):
        d[0]


def _in_memory(monkeypatch):
    """The calibration driver caching trains in memory, as before ``DiskTrain``."""
    def in_memory(train, signed=False):
        if isinstance(train, torch.Tensor):
            return train
        chunks = [c.to(torch.int8) if signed else c.clone() if c.dtype == torch.uint8
                  else c.bool() for c in train]
        return torch.cat(chunks)
    monkeypatch.setattr(calibration, "DiskTrain", in_memory)


@pytest.mark.parametrize("method", ["ftbc", "lp"])
def test_float_calibration_same_with_disk_cache(residual, monkeypatch, method):
    ann, x, snn = residual
    kw = dict(method=method, batches=2, batch_size=12, iterations=2, holdout=0.25, seed=1)
    disk, rep_disk = calibrate(snn, ann, x, **kw)
    with monkeypatch.context() as m:
        _in_memory(m)
        mem, rep_mem = calibrate(snn, ann, x, **kw)
    assert graphs_equal(disk, mem)
    rep_disk.pop("seconds"), rep_mem.pop("seconds")
    assert rep_disk == rep_mem


def test_integer_calibration_same_with_disk_cache_and_chunked_drives(residual, monkeypatch):
    """Integer FTBC: in-memory cache, disk cache, and no current cache with tiny time chunks
    (drives and layer outputs computed a step or two at a time) give the same mantissas."""
    ann, x, snn = residual
    target = get_target("loihi2")
    none, _ = calibrate(snn, ann, x, method="none")
    q = quantize(normalize(none), target)
    kw = dict(thresholds=cf.float_thresholds(snn), target=target, alpha=0.5, batches=2,
              batch_size=12, iterations=2, holdout=0.25, seed=1)
    results = []
    with monkeypatch.context() as m:
        _in_memory(m)
        results.append(cf.calibrate_fixed(q, ann, x, **kw))
    results.append(cf.calibrate_fixed(q, ann, x, **kw))
    with monkeypatch.context() as m:
        m.setattr(cf, "CURRENT_CACHE_BYTES", 0)
        m.setattr(cf, "CHUNK_ELEMENTS", 500)
        results.append(cf.calibrate_fixed(q, ann, x, **kw))
    reports = [r for _, r in results]
    for r in reports:
        r.pop("seconds")
    assert any(e["changed"] for e in reports[0]["layers"].values())
    for g, r in results[1:]:
        assert graphs_equal(g, results[0][0])
        assert r == reports[0]


def test_memory_estimate_is_per_batch_and_refuses_huge_runs():
    """The estimate grows with the samples at once, not with T beyond its two T terms (the
    capped current cache and the evaluation readouts); absurd settings are refused with the
    option to lower."""
    from core.errors import InputError
    from toolchain.memory import CURRENT_CACHE_BYTES, check_memory, estimate_bytes
    ann = residual_graph(seed=2, channels=6)
    x = np.zeros((100, 1, 8, 8), np.float32)
    kw = dict(at_once=64, calib_samples=100, eval_samples=50)
    small, p16 = estimate_bytes(ann, x, timesteps=16, **kw)
    big, p4096 = estimate_bytes(ann, x, timesteps=4096, **kw)
    assert p16["batch"] == p4096["batch"] > 0
    assert p4096["current_cache"] <= CURRENT_CACHE_BYTES
    assert big - small == (p4096["current_cache"] - p16["current_cache"]
                           + p4096["readouts"] - p16["readouts"])
    double, _ = estimate_bytes(ann, x, timesteps=16, **{**kw, "at_once": 128})
    assert double - small == p16["batch"]
    with pytest.raises(InputError, match="lower --eval-samples or --timesteps"):
        check_memory(ann, x, timesteps=10 ** 15, calib_batch=32, eval_samples=50)
    with pytest.raises(InputError, match="lower --calib-batch-size"):
        check_memory(ann, x, timesteps=4, calib_batch=10 ** 12, eval_samples=50)
