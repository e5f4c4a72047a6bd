"""Several ``--threshold-scale`` or ``--keep-rule`` values: ``pipeline.select``
FTBC-calibrates each (pair) and keeps the one whose output is closest to the ANN's
(``toolchain.fidelity``) on training images outside the calibration draw; the rest of the run
converts and calibrates with it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toolchain.calibrate
import toolchain.convert
import toolchain.resume as resume
from core.errors import InputError
from core.ir import graphs_equal
from sims.torch_snn import run_network
from tests.ann_builders import graph_from_sequential
from tests.fuzz_cases import run_cli
from tests.test_faults import DIGITS_MODEL
from tests.test_resume import Counted, _options, _results
from toolchain import pipeline
from toolchain.ann import ann_forward
from toolchain.calibrate import calibrate
from toolchain.convert import convert
from toolchain.fidelity import divergence_from_ann
from toolchain.pipeline import Options, Run, run_pipeline
from toolchain.report import candidate_name, provenance, selection_line, varied

CANDIDATES = (1.0, 1.2, 6.0)  # 6: thresholds far above every activation, never the closest
SETTINGS = dict(timesteps=3, calib_batches=1, calib_batch_size=32, iterations=1,
                verify_samples=0, progress=False)


@pytest.fixture(scope="module")
def traced() -> Run:
    run = Run(options=Options(model=DIGITS_MODEL, threshold_scale=CANDIDATES, **SETTINGS))
    return pipeline.trace(pipeline.load(run))


@pytest.fixture(scope="module")
def selected(traced) -> Run:
    return pipeline.select(traced)


def test_divergence_is_the_kl_from_the_anns_softmax_to_the_readout_over_t(traced):
    x = traced.data.x_train[:70]
    near, far = (convert(traced.ann, traced.calib, timesteps=3, threshold_scale=s)
                 for s in (1.0, 6.0))
    got = divergence_from_ann(near, traced.ann, x)
    ann_log = ann_forward(traced.ann, x).double().log_softmax(1)
    snn_log = (run_network(near, x).readout[-1].double() / 3).log_softmax(1)
    want = F.kl_div(snn_log, ann_log, reduction="none", log_target=True).sum(1)
    assert got.shape == (70,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-12)
    assert (got >= 0).all()
    # thresholds 6x too high leave most neurons silent: far from the ANN
    assert divergence_from_ann(far, traced.ann, x).mean() > 10 * got.mean()


def test_select_keeps_the_scale_closest_to_the_ann(traced, selected):
    chosen = selected.results["selection"]
    scores = chosen["divergence"]
    assert chosen["candidates"] == [{"threshold_scale": s, "keep_rule": "layer"}
                                    for s in CANDIDATES] and len(scores) == 3
    best = CANDIDATES[int(np.argmin(scores))]
    assert chosen["chosen"] == {"threshold_scale": best, "keep_rule": "layer"}
    assert selected.threshold_scale == best != 6.0 and selected.keep_rule == "layer"
    assert scores[2] > max(scores[:2])
    # each score is FTBC's network at that scale, scored on the selection images
    x = pipeline._selection_data(traced.options, traced.data)
    assert chosen["selection_samples"] == len(x) == pipeline.SELECTION_SAMPLES
    ftbc, _ = calibrate(convert(traced.ann, traced.calib, timesteps=3, threshold_scale=1.2),
                        traced.ann, traced.calib, method="ftbc", batches=1, batch_size=32,
                        iterations=1)
    assert scores[1] == pytest.approx(divergence_from_ann(ftbc, traced.ann, x).mean(),
                                      rel=1e-9)
    # never a calibration image
    calib = {row.tobytes() for row in traced.calib}
    assert not any(row.tobytes() in calib for row in x)
    # the run goes on with the chosen scale, and says so in every artifact
    converted = pipeline.convert(selected).snn["converted"]
    assert converted.meta["threshold_scale"] == best
    assert provenance(selected)["threshold_scale"] == best
    assert selection_line(chosen).startswith(f"threshold scale {best:g}, chosen by")


def test_one_scale_is_no_selection(traced):
    one = replace(traced, options=replace(traced.options, threshold_scale=(1.2,)))
    assert pipeline.select(one) is one
    assert one.threshold_scale == 1.2 and one.keep_rule == "layer"
    assert pipeline.convert(one).snn["converted"].meta["threshold_scale"] == 1.2


def test_no_training_image_left_to_select_on_is_a_named_error(traced):
    every = replace(traced.options, calib_batches=45, holdout=0.0)  # 45 x 32 >= 1437 images
    with pytest.raises(InputError, match="give one value of each, or fewer --calib-batches"):
        pipeline._selection_data(every, traced.data)


def test_a_value_given_twice_is_refused():
    code, _, err = run_cli([str(DIGITS_MODEL), "--threshold-scale", "1", "1.15", "1"])
    assert code == 2 and "--threshold-scale gives 1 more than once" in err
    code, _, err = run_cli([str(DIGITS_MODEL), "--keep-rule", "network", "layer", "network"])
    assert code == 2 and "--keep-rule gives network more than once" in err


def test_a_run_stopped_while_selecting_resumes_from_each_scored_scale(tmp_path, monkeypatch):
    scales = dict(threshold_scale=(1.0, 1.2))
    plain = run_pipeline(_options(tmp_path / "plain", **scales))
    folder = tmp_path / resume.FOLDER
    stopper = Counted(toolchain.calibrate.calibrate, stop_at=2)  # inside the second scale
    monkeypatch.setattr(toolchain.calibrate, "calibrate", stopper)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_options(tmp_path / "a", **scales), resume=folder)
    assert not (folder / resume.STATE).exists()  # no stage after trace had finished
    assert [p.name for p in folder.glob("part-*")] == ["part-select-1.0-layer.pkl"]

    calibrations = Counted(stopper.fn)
    monkeypatch.setattr(toolchain.calibrate, "calibrate", calibrations)
    run = run_pipeline(_options(tmp_path / "b", **scales), resume=folder)
    assert calibrations.calls == 1 + 2  # the second scale, then none / lp (ftbc: the choice's)
    assert run.results["resumed"]["parts"] == ["select:1.0:layer"]
    assert run.results["selection"] == plain.results["selection"]
    assert _results(run) == _results(plain)
    assert graphs_equal(run.quant, plain.quant)


def test_the_run_after_the_choice_is_the_run_given_that_scale_alone(tmp_path):
    """Selecting calibrates several networks first; nothing of theirs (no random state, no
    cache) reaches the run that follows, which is the one-scale run of the chosen scale."""
    several = run_pipeline(_options(tmp_path / "several", threshold_scale=(1.0, 1.2, 6.0)))
    chosen = several.results["selection"]["chosen"]["threshold_scale"]
    alone = run_pipeline(_options(tmp_path / "alone", threshold_scale=(chosen,)))
    assert "selection" not in alone.results
    assert _results(several) == _results(alone)
    assert graphs_equal(several.quant, alone.quant)
    assert (tmp_path / "several" / "network.net").read_bytes() == \
        (tmp_path / "alone" / "network.net").read_bytes()


def test_scales_that_change_no_threshold_are_calibrated_once(traced, monkeypatch):
    """A network whose every threshold is a clip (or QCFS's learned one) is the same network
    at every scale: the stage calibrates it once and gives each scale that score."""
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU6(), nn.AvgPool2d(8),
                        nn.Flatten(), nn.Linear(4, 10)).eval()
    clipped = replace(traced, ann=graph_from_sequential(seq, (1, 8, 8)))
    calibrations = Counted(toolchain.calibrate.calibrate)
    monkeypatch.setattr(toolchain.calibrate, "calibrate", calibrations)
    chosen = pipeline.select(clipped).results["selection"]
    assert calibrations.calls == 1
    assert len(set(chosen["divergence"])) == 1
    assert chosen["chosen"]["threshold_scale"] == CANDIDATES[0]


def test_select_keeps_the_keep_rule_closest_to_the_ann(traced):
    rules = ("layer", "network")
    run = replace(traced, options=replace(traced.options, threshold_scale=(1.2,),
                                          keep_rule=rules))
    chosen = pipeline.select(run).results["selection"]
    x = pipeline._selection_data(run.options, run.data)
    snn = convert(traced.ann, traced.calib, timesteps=3, threshold_scale=1.2)
    want = [divergence_from_ann(calibrate(snn, traced.ann, traced.calib, method="ftbc",
                                          batches=1, batch_size=32, iterations=1,
                                          keep=rule)[0], traced.ann, x).mean()
            for rule in rules]
    assert chosen["candidates"] == [{"threshold_scale": 1.2, "keep_rule": r} for r in rules]
    assert chosen["divergence"] == pytest.approx(want, rel=1e-9)
    best = int(np.argmin(want))
    assert best != 0  # (the rules differ here, and the first is not the closest)
    assert chosen["chosen"] == {"threshold_scale": 1.2, "keep_rule": rules[best]}
    assert selection_line(chosen).startswith(f"keep rule {rules[best]}, chosen by")


def test_several_scales_and_rules_try_every_pair_converting_once_per_scale(traced, monkeypatch):
    conversions = Counted(toolchain.convert.convert)
    monkeypatch.setattr(toolchain.convert, "convert", conversions)
    run = replace(traced, options=replace(traced.options, threshold_scale=(1.0, 1.2),
                                          keep_rule=("layer", "network")))
    chosen = pipeline.select(run).results["selection"]
    assert conversions.calls == 2
    assert chosen["candidates"] == [{"threshold_scale": s, "keep_rule": r}
                                    for s in (1.0, 1.2) for r in ("layer", "network")]
    assert chosen["chosen"] == chosen["candidates"][int(np.argmin(chosen["divergence"]))]
    assert selection_line(chosen).startswith(
        f"threshold scale and keep rule {chosen['chosen']['threshold_scale']:g}/"
        f"{chosen['chosen']['keep_rule']}, chosen by")
    assert candidate_name({"threshold_scale": 1.0, "keep_rule": "network"},
                          varied(chosen["candidates"]), labelled=True) == \
        "threshold scale 1, keep rule network"


def test_the_run_after_choosing_a_keep_rule_is_the_run_given_that_rule_alone(tmp_path,
                                                                           monkeypatch):
    """...and the chosen pair's FTBC network is select's own, not calibrated again."""
    methods = []

    def recorded(*args, **kwargs):
        methods.append(kwargs["method"])
        return calibrate(*args, **kwargs)
    monkeypatch.setattr(toolchain.calibrate, "calibrate", recorded)
    several = run_pipeline(_options(tmp_path / "several", keep_rule=("network", "layer")))
    assert methods == ["ftbc", "ftbc", "none", "lp"]
    chosen = several.results["selection"]["chosen"]["keep_rule"]
    assert chosen != "network"  # (here the second is the closest: the order is not what wins)
    assert several.keep_rule == chosen
    for report in (*several.results["calibration"].values(),
                   several.results["fixed_calibration"]):
        assert report["keep_rule"] == chosen
    alone = run_pipeline(_options(tmp_path / "alone", keep_rule=(chosen,)))
    assert methods[4:] == ["none", "lp", "ftbc"]
    assert _results(several) == _results(alone)
    assert graphs_equal(several.snn["ftbc"], alone.snn["ftbc"])
    assert (tmp_path / "several" / "network.net").read_bytes() == \
        (tmp_path / "alone" / "network.net").read_bytes()
