"""``--resume`` (``toolchain.resume``): a run stopped part-way continues from its checkpoint
and ends with exactly the results of a run that was never stopped; a checkpoint of another
run (options, data, code) or a damaged one is never used."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import sims.torch_snn
import toolchain.calibrate
import toolchain.resume as resume
from core.ir import graphs_equal
from tests.test_faults import DIGITS_MODEL, run_cli
from tests.test_signals import SETTINGS, Run
from toolchain.pipeline import KEY_STAGE, LAST_CHECKPOINT, STAGES, Options, run_pipeline
from toolchain.report import build_report

SMALL = dict(target="loihi2", timesteps=3, calib_batches=1, calib_batch_size=32, iterations=1,
             eval_samples=60, verify_samples=0, progress=False)


def _options(out: Path, **changes) -> Options:
    return Options(model=DIGITS_MODEL, out=out, **{**SMALL, **changes})


class Counted:
    """A real function, its calls counted; ``stop_at``: the call that raises Ctrl-C."""

    def __init__(self, fn, stop_at: int | None = None):
        self.fn, self.stop_at, self.calls = fn, stop_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.fn(*args, **kwargs)


def _results(run) -> dict:
    report = build_report(run)
    return {k: report[k] for k in ("ann_accuracy", "snn_accuracy", "fixed_accuracy",
                                   "snn_agreement", "fixed_agreement", "saturations",
                                   "quantization")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the same run, never stopped, no checkpoints."""
    out = tmp_path_factory.mktemp("plain")
    return run_pipeline(_options(out))


@pytest.fixture(scope="module")
def finished_checkpoint(tmp_path_factory) -> Path:
    """The checkpoint folder a finished run with ``SMALL`` options left."""
    folder = tmp_path_factory.mktemp("finished") / resume.FOLDER
    run_pipeline(_options(folder.parent / "out"), resume=folder)
    return folder


@pytest.fixture
def folder(finished_checkpoint, tmp_path) -> Path:
    """A copy of ``finished_checkpoint`` for one test to use and change."""
    return Path(shutil.copytree(finished_checkpoint, tmp_path / resume.FOLDER))


def test_a_run_stopped_inside_scoring_resumes_to_the_same_results(tmp_path, monkeypatch,
                                                                 uninterrupted):
    folder = tmp_path / resume.FOLDER
    stopper = Counted(sims.torch_snn.simulate, stop_at=3)  # none and lp scored, then stopped
    monkeypatch.setattr(sims.torch_snn, "simulate", stopper)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_options(tmp_path / "a"), resume=folder)
    saved = pickle.loads((folder / resume.STATE).read_bytes())
    assert saved["name"] == "calibrate"
    assert sorted(p.name for p in folder.glob("part-*")) == [
        "part-simulate-lp.pkl", "part-simulate-none.pkl"]

    calibrations = Counted(toolchain.calibrate.calibrate)
    scorings = Counted(stopper.fn)
    monkeypatch.setattr(toolchain.calibrate, "calibrate", calibrations)
    monkeypatch.setattr(sims.torch_snn, "simulate", scorings)
    run = run_pipeline(_options(tmp_path / "b"), resume=folder)
    assert calibrations.calls == 0 and scorings.calls == 1  # only FTBC's scoring was left
    assert run.results["resumed"] == {"after_stage": "calibrate",
                                      "parts": ["simulate:none", "simulate:lp"]}
    assert _results(run) == _results(uninterrupted)
    assert graphs_equal(run.quant, uninterrupted.quant)
    assert (tmp_path / "b" / "network.net").read_bytes() == \
        (uninterrupted.options.out / "network.net").read_bytes()
    assert not list(folder.glob("part-*"))  # folded into the stage's checkpoint
    # the restored graphs are read-only again, as the IR's arrays always are
    assert not run.snn["ftbc"].layers[0].synapses[0].weight.flags.writeable


def test_a_checkpoint_of_other_options_is_not_used(tmp_path, monkeypatch, folder):
    calibrations = Counted(toolchain.calibrate.calibrate)
    monkeypatch.setattr(toolchain.calibrate, "calibrate", calibrations)
    run = run_pipeline(_options(tmp_path / "b", seed=1), resume=folder)
    assert calibrations.calls == 3 and "resumed" not in run.results
    # where outputs go, how progress shows and how many samples Lava verifies change no
    # checkpointed result: the checkpoint is used
    calibrations.calls = 0
    run = run_pipeline(_options(tmp_path / "c", seed=1, progress=True, verify_samples=3),
                       resume=folder)
    assert calibrations.calls == 0 and run.results["resumed"]["after_stage"] == "emulate"


def test_changed_code_or_a_damaged_checkpoint_starts_afresh(tmp_path, monkeypatch, capsys,
                                                           folder):
    calibrations = Counted(toolchain.calibrate.calibrate)
    monkeypatch.setattr(toolchain.calibrate, "calibrate", calibrations)
    real = resume.code_digest()
    monkeypatch.setattr(resume, "code_digest", lambda: "edited " + real)
    run_pipeline(_options(tmp_path / "b", progress=True), resume=folder)
    assert calibrations.calls == 3
    assert "is of another run" in capsys.readouterr().err
    monkeypatch.setattr(resume, "code_digest", lambda: real)
    state = folder / resume.STATE
    state.write_bytes(state.read_bytes()[:1000])  # a truncated file
    run = run_pipeline(_options(tmp_path / "c"), resume=folder)
    assert calibrations.calls == 6 and "resumed" not in run.results


def test_the_key_covers_data_and_weights(uninterrupted):
    run = uninterrupted
    key = resume.run_key(run)
    assert resume.run_key(run) == key
    x = run.data.x_test.copy()
    x[0, 0, 0, 0] += 1.0
    assert resume.run_key(replace(run, data=replace(run.data, x_test=x))) != key
    conv = run.ann.nodes[1]
    changed = replace(conv, weight=conv.weight * 1.5)
    ann = replace(run.ann, nodes=(run.ann.nodes[0], changed, *run.ann.nodes[2:]))
    assert resume.run_key(replace(run, ann=ann)) != key


def test_agreement_is_the_share_of_samples_on_the_anns_top1(uninterrupted):
    """``snn_agreement`` / ``fixed_agreement`` (the reference run's): per step, the percent of
    evaluation samples whose SNN top-1 is the ANN's, recomputed here from the graphs."""
    from sims.emulator import emulate
    from sims.torch_snn import simulate
    from toolchain.ann import ann_predictions
    from toolchain.pipeline import _eval_split
    run = uninterrupted
    x, _ = _eval_split(run)
    top1 = ann_predictions(run.ann, x)
    for method, agree in run.results["snn_agreement"].items():
        expected = 100.0 * (simulate(run.snn[method], x).predictions == top1).mean(1)
        np.testing.assert_allclose(agree, expected, rtol=0, atol=1e-9, err_msg=method)
    expected = 100.0 * (emulate(run.quant, x).predictions == top1).mean(1)
    np.testing.assert_allclose(run.results["fixed_agreement"], expected, rtol=0, atol=1e-9)
    assert run.results["snn_agreement"].keys() == run.results["snn_accuracy"].keys()
    # (the ANN gets all 60 of these samples right, so here agreement is accuracy too; the
    # next test tells the two apart)


def test_agreement_counts_the_anns_top1_not_the_label():
    from toolchain.data import DataSplit
    from toolchain.pipeline import Run as PipelineRun, _scores
    y = np.array([0, 1, 2, 3])
    data = DataSplit("toy", y[:, None].astype(np.float32), y, y[:, None].astype(np.float32), y)
    run = PipelineRun(options=Options(model=DIGITS_MODEL), data=data,
                      ann_labels=np.array([0, 1, 2, 0]))  # the ANN misses the last sample
    predictions = np.array([[0, 1, 2, 3], [0, 1, 1, 0]])  # (T = 2, n = 4)
    accuracy, agreement = _scores(run, predictions)
    np.testing.assert_allclose(accuracy, [100.0, 50.0])
    np.testing.assert_allclose(agreement, [75.0, 75.0])


def test_sigterm_then_the_same_command_continues_and_cleans_up(tmp_path):
    """The CLI end to end: a real run in its own process group gets a scheduler's SIGTERM
    during calibration, exits 143 keeping its checkpoint; the same command again continues
    after calibration and ends with the results of an unstopped run; the checkpoint folder
    is gone once it succeeded."""
    out, plain = tmp_path / "out", tmp_path / "plain"
    run = Run(out, "--resume", "--target", "loihi2", "--verify-samples", "0")
    run.wait_for("] calibrate")
    os.killpg(run.proc.pid, signal.SIGTERM)
    code, _ = run.finish()
    if code == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert code == 143, run.text()[-2000:]
    assert (out / resume.FOLDER / resume.STATE).exists()
    assert not (out / "report.json").exists()

    again = Run(out, "--resume", "--target", "loihi2", "--verify-samples", "0")
    code, _ = again.finish()
    assert code == 0, again.text()[-2000:]
    assert "resume: continuing after stage" in again.text()
    assert not (out / resume.FOLDER).exists()
    code, _, err = run_cli([str(DIGITS_MODEL), "--out", str(plain), *SIGNAL_SETTINGS])
    assert code == 0, err
    resumed, fresh = (json.loads((d / "report.json").read_text()) for d in (out, plain))
    names = [stage.__name__ for stage in STAGES]
    checkpointed = names[names.index(KEY_STAGE) + 1:names.index(LAST_CHECKPOINT) + 1]
    assert resumed["resumed"]["after_stage"] in checkpointed
    assert "resumed" not in fresh
    for key in ("snn_accuracy", "fixed_accuracy", "calibration"):
        assert _drop_seconds(resumed[key]) == _drop_seconds(fresh[key]), key
    assert (out / "network.net").read_bytes() == (plain / "network.net").read_bytes()


# the signal tests' run settings (``Run`` adds them), as the stopped run above used them
SIGNAL_SETTINGS = [*SETTINGS, "--target", "loihi2", "--verify-samples", "0", "--no-progress"]


def _drop_seconds(obj):
    if isinstance(obj, dict):
        return {k: _drop_seconds(v) for k, v in obj.items() if "seconds" not in k}
    if isinstance(obj, list):
        return [_drop_seconds(v) for v in obj]
    return obj
