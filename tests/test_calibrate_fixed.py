"""Integer-domain FTBC: only kept layers change, the result validates, deterministic,
held-out error never increases, emulator == reference on the result, bias range respected."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import toolchain.calibrate_fixed as cf
from core.errors import InputError
from core.ir import evolve, graphs_equal
from exporters.quantize import quantize, validate
from hw_targets import get_target
from sims import engine
from sims.emulator import emulate
from sims.reference import encode_input, reference_run
from tests.ann_builders import train_digits_cnn
from toolchain.calibrate import calibrate, split_calibration
from toolchain.calibrate_fixed import calibrate_fixed, float_thresholds
from toolchain.calibration import LENIENT_Z, CalibrationOptions, running_logit_error
from toolchain.convert import convert
from toolchain.normalize import normalize

torch.set_num_threads(1)
TARGET = get_target("loihi2")
KW = dict(alpha=0.5, batches=2, batch_size=64, iterations=2, holdout=0.25, seed=1)


@pytest.fixture(scope="module")
def setup():
    """(ann, x_calib, x_check, {T: (converted snn, quantized uncalibrated graph)})."""
    ann, data = train_digits_cnn()
    order = np.random.default_rng(0).permutation(len(data.x_train))
    x_calib, x_check = data.x_train[order[:300]], data.x_train[order[300:600]]
    graphs = {}
    for steps in (2, 3):
        snn = convert(ann, x_calib, timesteps=steps)
        none, _ = calibrate(snn, ann, x_calib, method="none")
        graphs[steps] = snn, quantize(normalize(none), TARGET)
    return ann, x_calib, x_check, graphs


def _fixed(setup, steps=2, **kw):
    ann, x_calib, _, graphs = setup
    snn, q = graphs[steps]
    return q, calibrate_fixed(q, ann, x_calib, thresholds=float_thresholds(snn),
                              target=TARGET, **{**KW, **kw})


def test_only_kept_layers_change_and_result_validates(setup):
    q, (new, report) = _fixed(setup)
    assert validate(q, TARGET) == [] and validate(new, TARGET) == []
    assert report["violations"] == []
    assert set(report["layers"]) == {l.name for l in q.layers if not l.readout}
    for old, layer in zip(q.layers, new.layers):
        entry = report["layers"].get(layer.name)
        changed = not np.array_equal(old.bias_mant, layer.bias_mant)
        if entry is None or not entry["kept"] or report["holdout"]["reverted"]:
            assert not changed, layer.name
        assert entry is None or entry["kept"] == (
            entry["holdout_error_after"] < entry["holdout_error_before"])
        # everything but the bias mantissas is untouched
        assert graphs_equal(evolve(layer, bias_mant=old.bias_mant), old)
        assert layer.bias_mant.dtype == np.int64
    assert any(e["kept"] and e["changed"] for e in report["layers"].values())
    assert new.meta["fixed_calibration"]["method"] == "ftbc-fixed"


def test_network_keep_rule_keeps_every_layer(setup):
    """keep="network": every layer's integer correction is kept (unless the final guard
    reverts them all); the first layer's fit does not depend on the rule."""
    q, (new, report) = _fixed(setup, keep="network")
    _, (by_layer, layer_report) = _fixed(setup)
    assert report["keep_rule"] == "network" and layer_report["keep_rule"] == "layer"
    assert all(e["kept"] for e in report["layers"].values())
    assert validate(new, TARGET) == []
    first = next(l.name for l in q.layers if not l.readout)
    if not report["holdout"]["reverted"]:
        for old, layer in zip(q.layers, new.layers):
            entry = report["layers"].get(layer.name)
            if entry is not None:
                assert (entry["changed"] > 0) == (not np.array_equal(old.bias_mant, layer.bias_mant))
        if layer_report["layers"][first]["kept"] and not layer_report["holdout"]["reverted"]:
            np.testing.assert_array_equal(new.layer(first).bias_mant,
                                          by_layer.layer(first).bias_mant)


def test_lenient_keep_rule_on_the_integer_network(setup):
    """keep="lenient" drives the integer FTBC too: a layer is kept when its held-out error
    drops or its paired rise is not significant, and the result is a valid network."""
    _, (new, report) = _fixed(setup, keep="lenient")
    assert report["keep_rule"] == "lenient" and validate(new, TARGET) == []
    for e in report["layers"].values():
        assert e["kept"] == (e["holdout_error_after"] < e["holdout_error_before"]
                             or e["holdout_t"] <= LENIENT_Z)


def test_deterministic(setup):
    _, (a, rep_a) = _fixed(setup)
    _, (b, rep_b) = _fixed(setup)
    assert graphs_equal(a, b)
    rep_a.pop("seconds"), rep_b.pop("seconds")
    assert rep_a == rep_b


@pytest.mark.parametrize("steps", [2, 3])
def test_holdout_error_does_not_increase(setup, steps):
    """The network-output error on the held-out split (the selection criterion) of the result
    is at most that of the input graph."""
    ann, x_calib, _, graphs = setup
    q, (new, report) = _fixed(setup, steps)
    _, hold = split_calibration(x_calib, KW["holdout"], KW["batches"], KW["batch_size"],
                                KW["seed"])
    thresholds = float_thresholds(graphs[steps][0])
    batch = cf.IntegerRule(q, ann, thresholds, TARGET, CalibrationOptions()).batch(hold)

    def error(g):
        rule = cf.IntegerRule(g, ann, thresholds, TARGET, CalibrationOptions())
        return running_logit_error(rule.readout(batch, {}, 0), batch.logits)

    assert error(new) <= error(q)
    kept = [e for e in report["layers"].values() if e["kept"]]
    if kept and not report["holdout"]["reverted"]:
        assert error(new) == pytest.approx(kept[-1]["holdout_error_after"], rel=1e-12)


def test_emulator_equals_reference_on_result(setup):
    _, x_calib, x_check, _ = setup
    _, (new, _) = _fixed(setup)
    x = x_check[:4]
    emu = emulate(new, x, record=True)
    for i in range(len(x)):
        ref = reference_run(new, encode_input(new.input, x[i:i + 1])[0])
        for layer in new.layers:
            got = emu.readout_trace[i] if layer.readout else emu.spikes[layer.name][:, i]
            np.testing.assert_array_equal(got, ref[layer.name])


def test_mantissas_clip_to_13_bits_and_are_reported(setup):
    """A huge alpha drives updates past the 13-bit range: clipped, counted, still valid."""
    q, (new, report) = _fixed(setup, alpha=1e4, holdout=0.0)
    assert sum(e["clamped"] for e in report["layers"].values()) > 0
    assert validate(new, TARGET) == []
    for layer in new.layers:
        assert layer.bias_mant.min() >= TARGET.bias_mant_min
        assert layer.bias_mant.max() <= TARGET.bias_mant_max
    assert graphs_equal(new.readout, q.readout)


def test_fixed_ftbc_step_matches_float_update():
    """One step, one channel, hand-computed: rate 0 against target 0.75, vth 1000,
    bias_exp 2, alpha 0.5 -> mantissa += rint(0.5 * 0.75 * 1000 / 4) = 94."""
    from core.ir import QLayer, QSynapse, frozen_array
    layer = QLayer(name="l", shape=(1,), synapses=(QSynapse("input", "dense",
                                                            frozen_array([[0]], np.int32)),),
                   vth=frozen_array([1000], np.int64), bias_mant=frozen_array([[0]], np.int64),
                   bias_exp=2, v_init=frozen_array([0], np.int64), depth=1,
                   scale=frozen_array([1000.0]))
    lp = engine.plan_integer_layer(layer, {"input": (1,)}, engine.IntegerArithmetic(TARGET),
                                   torch.device("cpu"))
    mant = torch.zeros((1, 1), dtype=torch.float64)
    drive = torch.zeros((4, 1), dtype=lp.dtype)
    cf._ftbc_pass(lp, layer, drive, torch.tensor([[0.75]], dtype=torch.float64), mant, 0.5,
                  (-4096.0, 4095.0))
    assert mant.item() == 94


def test_bad_arguments_are_input_errors(setup):
    ann, x_calib, _, graphs = setup
    snn, q = graphs[2]
    with pytest.raises(InputError, match="thresholds"):
        calibrate_fixed(q, ann, x_calib, thresholds={}, target=TARGET)
    with pytest.raises(InputError, match="target"):
        calibrate_fixed(q, ann, x_calib, thresholds=float_thresholds(snn),
                        target=get_target("float"))
    with pytest.raises(InputError, match="alpha"):
        calibrate_fixed(q, ann, x_calib, thresholds=float_thresholds(snn), target=TARGET,
                        alpha=0)
    with pytest.raises(InputError, match="normalisation"):
        float_thresholds(normalize(snn))


def test_solved_integer_ftbc_reaches_the_nearest_rate_at_every_step(setup):
    """``fit="solve"`` in the integer domain: every layer's step-t mantissa gives the
    calibration batches' mean rate nearest the mean target that any 13-bit mantissa could
    give (upstream and the layer's earlier steps as calibrated). Checked with the numpy
    reference (``sims.reference``): membranes of the result, every mantissa in the range
    tried by exact integer counting. The sweeps stop short of that on the same batches."""
    from sims.reference import ACT_SHIFT, STATE_MAX, STATE_MIN, synapse_output
    ann, x_calib, _, graphs = setup
    snn, q = graphs[3]
    thresholds = float_thresholds(snn)
    kw = dict(batches=2, batch_size=16, holdout=0.0, keep="network", seed=1)
    x = x_calib[:32]
    solved, report = calibrate_fixed(q, ann, x, thresholds=thresholds, target=TARGET,
                                     fit="solve", **kw)
    swept, _ = calibrate_fixed(q, ann, x, thresholds=thresholds, target=TARGET, **kw)
    assert report["fit"] == "solve" and validate(solved, TARGET) == []
    parts, _ = split_calibration(x, 0.0, 2, 16, 1)
    rule = cf.IntegerRule(q, ann, thresholds, TARGET, CalibrationOptions())
    targets = [rule.batch(xb).targets for xb in parts]  # (T, C) spikes per step, per batch
    grid = np.arange(TARGET.bias_mant_min, TARGET.bias_mant_max + 1, dtype=np.int64)
    gaps = {}
    for fit, g in (("solve", solved), ("sweep", swept)):
        gaps[fit] = []
        pre = [[] for _ in g.layers]  # per layer, per batch: (T, B, n) before the bias
        for xb in parts:
            runs = [reference_run(g, encode_input(g.input, xb[i:i + 1])[0])
                    for i in range(len(xb))]
            for k, layer in enumerate(g.layers[:-1]):
                per_sample = []
                for i, out in enumerate(runs):
                    cur = np.zeros((g.timesteps, int(np.prod(layer.shape))), np.int64)
                    for syn in layer.synapses:
                        for t in range(g.timesteps):
                            src = (encode_input(g.input, xb[i:i + 1])[0] if syn.source == "input"
                                   else out[syn.source][t].reshape(g.layer(syn.source).shape))
                            cur[t] += synapse_output(syn, src)
                    per_sample.append(_membranes_before_bias(layer, cur, out[layer.name],
                                                             ACT_SHIFT, STATE_MIN, STATE_MAX))
                pre[k].append(np.stack(per_sample, axis=1))
        for k, layer in enumerate(g.layers[:-1]):
            unit = 1 << layer.bias_exp
            channels = layer.shape[0]
            vth = np.broadcast_to(np.asarray(layer.vth, np.int64), (channels,))
            gap = np.zeros((g.timesteps, channels))
            for t in range(g.timesteps):
                want = np.mean([tg[layer.name][t].cpu().numpy() for tg in targets], axis=0)
                for c in range(channels):
                    rates = 0.0
                    for u in pre[k]:  # u (T, B, n); channel c's neurons
                        uc = np.sort(u[t].reshape(u.shape[1], channels, -1)[:, c].ravel())
                        # fires iff clip(u + m * unit) >= vth, i.e. u >= vth - m * unit
                        below = np.searchsorted(uc, vth[c] - grid * unit, side="left")
                        rates = rates + (len(uc) - below) / len(uc) / len(pre[k])
                    best = np.abs(rates - want[c]).min()
                    got = abs(rates[layer.bias_mant[t, c] - TARGET.bias_mant_min] - want[c])
                    gap[t, c] = got - best
            gaps[fit].append(gap)
    assert max(g.max() for g in gaps["solve"]) < 1e-12
    assert sum(g.sum() for g in gaps["sweep"]) > 1e-3


def _membranes_before_bias(layer, cur, spikes, shift, lo, hi) -> np.ndarray:
    """(T, n): an IF layer's ``v + (a << shift)`` at each step before its bias (as
    ``sims.reference.run_layer`` steps it; its own spikes from the reference run)."""
    n = cur.shape[1]
    per_channel = n // layer.shape[0]
    v = np.repeat(layer.v_init.astype(np.int64), per_channel)
    vth = np.repeat(np.broadcast_to(np.asarray(layer.vth, np.int64), layer.shape[:1]),
                    per_channel)
    out = np.zeros_like(cur)
    for t in range(cur.shape[0]):
        out[t] = v + (cur[t] << shift)
        bias = np.repeat(layer.bias_mant[t].astype(np.int64) << layer.bias_exp, per_channel)
        v = np.clip(out[t] + bias, lo, hi)
        assert np.array_equal(v >= vth, spikes[t] == 1)  # the reference fired the same
        v = v - spikes[t] * vth
    return out
