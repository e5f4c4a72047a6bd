"""Faults: killed runs, failing stages, unwritable outputs, bad weights, dead channels,
hardware limits, verification mismatches; one test per documented exit code.

Outputs are staged in ``OUT/.ftbc-staging-<pid>-*`` and moved into place only when the whole
run succeeded (``toolchain.cli``), so every failure below must leave a previous good run's
files byte-identical and no staging folder or ``.tmp`` file behind.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn

import exporters.netx
import toolchain.report
from core.errors import InputError
from exporters.netx import read_netx
from tests.fuzz_cases import TINY, run_cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "examples" / "digits_cnn.pt"
OUTPUTS = ("network.net", "report.json", "accuracy.png")


# --------------------------------------------------------------------------- helpers

def snapshot(out: Path) -> dict[str, bytes]:
    """Every entry of ``out`` (hidden ones included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def assert_intact(out: Path, before: dict[str, bytes]) -> None:
    """The previous good outputs, byte for byte, and nothing else (no staging, no .tmp)."""
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert snapshot(out) == before


def one_line_error(err: str) -> str:
    """The last stderr line, which must be the whole error (progress lines come before)."""
    lines = [line for line in err.strip().splitlines() if line]
    assert lines[-1].startswith("ftbc-export: error:"), err[-2000:]
    assert [line for line in lines if line.startswith("ftbc-export:")] == [lines[-1]]
    return lines[-1]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A previous good run (target loihi2, tiny settings) and its outputs' bytes."""
    out = tmp_path_factory.mktemp("faults") / "out"
    code, _, err = run_cli([str(DIGITS_MODEL), "--target", "loihi2", "--out", str(out), *TINY,
                            "--no-progress"])
    assert code == 0, err
    before = snapshot(out)
    assert set(OUTPUTS) <= set(before)  # (+ netlist.json where the target writes one)
    return out, before


def small_cnn(seed: int = 0) -> nn.Sequential:
    """conv(1->4)-ReLU-Flatten-Linear(256->16)-ReLU-Linear(16->10) for 8x8 digits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


def save_script(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model), str(path))
    return path


# --------------------------------------------------------------------------- kill a real run

def _start(out: Path, *extra: str) -> subprocess.Popen:
    """A real ``ftbc-export`` process, with other settings than the good run (T=3), so
    outputs it managed to write would differ. A Python signal handler runs at the next
    bytecode, so even a short stage is hit once it is announced."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "toolchain.cli", str(DIGITS_MODEL), "--out", str(out),
         *TINY, "--timesteps", "3", *extra],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_at(proc: subprocess.Popen, stage: str, sig: int) -> tuple[int, str]:
    """Send ``sig`` once stderr announces ``stage`` ("[4/11] calibrate"); (code, stderr)."""
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stderr:
        seen.append(line)
        if f"] {stage}" in line:
            proc.send_signal(sig)
            break
        assert time.monotonic() < deadline, "stage never announced"
    else:
        proc.wait(timeout=60)
        pytest.fail(f"run ended before stage {stage}: {''.join(seen)[-2000:]}")
    try:
        rest = proc.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        rest = proc.communicate()[1]
        pytest.fail("the run did not stop after the signal")
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("sig, stage, target", [
    (signal.SIGINT, "calibrate", "loihi2"),
    (signal.SIGTERM, "calibrate", "loihi2"),
    (signal.SIGTERM, "emulate", "loihi2"),     # network.net is not written yet
    (signal.SIGINT, "report", "loihi2"),       # network.net exists, only in staging
])
def test_killed_run_leaves_previous_outputs(good_run, sig, stage, target):
    out, before = good_run
    proc = _start(out, "--target", target, "--verify-samples", "0")
    code, err = _kill_at(proc, stage, sig)
    if code == 0:  # the signal came after the commit: nothing to check but consistency
        pytest.skip(f"run finished before {signal.Signals(sig).name} arrived")
    assert code == 128 + sig, err[-2000:]
    assert err.strip().splitlines()[-1] == \
        "ftbc-export: interrupted; previous outputs left intact"
    assert_intact(out, before)


def test_stage_exception_leaves_previous_outputs(good_run, monkeypatch):
    """The last output (accuracy.png) fails after network.net and report.json were written:
    exit 1 (a bug), and the previous three files are untouched."""
    out, before = good_run

    def broken_plot(report, path):
        raise RuntimeError("plotting exploded")
    monkeypatch.setattr(toolchain.report, "plot_accuracy", broken_plot)
    code, _, err = run_cli([str(DIGITS_MODEL), "--target", "loihi2", "--out", str(out),
                            *TINY, "--timesteps", "3"])
    assert code == 1
    assert "internal error: RuntimeError: plotting exploded" in err
    assert "This is a bug in ftbc" in err
    assert_intact(out, before)


def test_bad_model_leaves_previous_outputs(good_run, tmp_path):
    out, before = good_run
    bad = tmp_path / "bad.pt"
    bad.write_bytes(DIGITS_MODEL.read_bytes()[:5000])
    code, _, err = run_cli([str(bad), "--target", "loihi2", "--out", str(out), *TINY])
    assert code == 2 and "corrupt" in one_line_error(err)
    assert_intact(out, before)


def test_failed_first_run_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "out"
    code, _, err = run_cli([str(tmp_path / "missing.pt"), "--out", str(out), *TINY])
    assert code == 2
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really")
    code, _, err = run_cli([str(bad), "--out", str(out), *TINY])
    assert code == 2 and not out.exists() and not (tmp_path / "new").exists()


def test_stale_staging_folder_of_a_dead_run_is_removed(good_run):
    """A run killed with SIGKILL cannot clean up; the next run removes its staging folder."""
    out, before = good_run
    stale = out / ".ftbc-staging-999999999-abc"
    stale.mkdir()
    (stale / "network.net").write_bytes(b"half")
    code, _, err = run_cli([str(DIGITS_MODEL), "--target", "loihi2", "--out", str(out),
                            *TINY, "--timesteps", "x"])
    assert code == 2  # argparse: nothing ran, nothing touched
    assert stale.exists()
    bad = out / "not-a-model.txt"
    try:
        bad.write_text("hello")
        code, _, err = run_cli([str(bad), "--target", "loihi2", "--out", str(out), *TINY])
        assert code == 2
    finally:
        bad.unlink()
    assert not stale.exists()
    assert_intact(out, before)


# --------------------------------------------------------------------------- output paths

@pytest.mark.parametrize("sub", ["file/sub", "file"])
def test_unwritable_output_directory(tmp_path, sub):
    """A path under a regular file cannot be created, even by root: exit 2, path named."""
    (tmp_path / "file").write_text("I am a file")
    out = tmp_path / sub
    start = time.perf_counter()
    code, _, err = run_cli([str(DIGITS_MODEL), "--out", str(out), *TINY])
    assert code == 2
    line = one_line_error(err)
    assert str(out) in line and "--out" in line
    assert time.perf_counter() - start < 10  # refused before the pipeline ran
    assert (tmp_path / "file").read_text() == "I am a file"


def test_disk_full_while_writing(good_run, monkeypatch):
    out, before = good_run

    def full(q, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(exporters.netx, "write_netx", full)
    code, _, err = run_cli([str(DIGITS_MODEL), "--target", "loihi2", "--out", str(out),
                            *TINY])
    assert code == 2
    assert "No space left on device" in one_line_error(err)
    assert_intact(out, before)


# --------------------------------------------------------------------------- bad weights

@pytest.mark.parametrize("poison, layer", [
    ("nan_conv", "0 (Conv2d)"), ("inf_linear", "3 (Linear)"), ("negative_var", "BatchNorm2d")])
def test_nan_or_inf_weights_are_named(tmp_path, poison, layer):
    torch.manual_seed(0)
    if poison == "negative_var":
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                              nn.Flatten(), nn.Linear(256, 10)).eval()
        with torch.no_grad():
            model[1].running_var[2] = -1.0   # sqrt(var + eps) is NaN after folding
    else:
        model = small_cnn()
        with torch.no_grad():
            if poison == "nan_conv":
                model[0].weight[1, 0, 1, 1] = float("nan")
            else:
                model[3].weight[2, 7] = float("inf")
    path = save_script(model, tmp_path / "poisoned.pt")
    code, _, err = run_cli([str(path), "--out", str(tmp_path / "out"), *TINY])
    assert code == 2
    line = one_line_error(err)
    assert "NaN or Inf" in line and layer in line
    assert "Warning" not in err
    assert not (tmp_path / "out").exists()


def test_dead_channels_get_a_recorded_fallback_threshold(tmp_path):
    """Channels silent on all calibration data get the layer's largest threshold (never 0);
    report.json and network.net record them, and the run succeeds."""
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0        # conv channel 2: always negative -> dead
        model[3].weight[5] = 0.0
        model[3].bias[5] = -1.0        # hidden unit 5: dead
    path = save_script(model, tmp_path / "dead.pt")
    out = tmp_path / "out"
    code, _, err = run_cli([str(path), "--target", "loihi2", "--out", str(out), *TINY])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    fallback = report["conversion"]["fallback_channels"]
    assert 2 in fallback["1"] and 5 in fallback["4"], fallback
    q = read_netx(out / "network.net")
    assert q.meta["source"]["fallback_channels"] == fallback
    assert all(np.all(layer.vth > 0) for layer in q.layers if not layer.readout)
    assert all(np.isfinite(acc).all() for acc in report["snn_accuracy"].values())


def test_weights_that_cannot_fit_list_every_violation(tmp_path):
    """Extreme weight ratios: a 1e9 weight into a dead unit (fallback threshold) and a 1e9
    readout weight. Exit 3, every violation listed, both layers named."""
    model = small_cnn()
    with torch.no_grad():
        model[0].weight[2] = 0.0
        model[0].bias[2] = -1.0
        model[3].weight[5] = 0.0
        model[3].weight[5, 2 * 64 + 10] = 1e9   # from the dead conv channel 2
        model[3].bias[5] = -1.0
        model[5].weight[3, 4] = 1e9
    path = save_script(model, tmp_path / "huge.pt")
    code, _, err = run_cli([str(path), "--target", "loihi2", "--out", str(tmp_path / "o"),
                            *TINY])
    assert code == 3, err
    lines = err.strip().splitlines()
    head = [i for i, line in enumerate(lines) if line.startswith("ftbc-export: error:")][-1]
    assert "does not fit target 'loihi2'" in lines[head]
    items = lines[head + 1:]
    assert items and all(line.startswith("  - layer ") for line in items)
    assert f"{len(items)} violation(s)" in lines[head]
    assert any(line.startswith("  - layer 4<-1: weight") for line in items)
    assert any(line.startswith("  - layer 5<-4: weight") for line in items)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- exit codes

def test_exit_0(good_run):
    out, before = good_run
    assert json.loads(before["report.json"])["target"] == "loihi2"


def test_exit_1_internal_error(monkeypatch, tmp_path):
    import toolchain.convert

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug")
    monkeypatch.setattr(toolchain.convert, "convert", boom)
    code, _, err = run_cli([str(DIGITS_MODEL), "--out", str(tmp_path / "o"), *TINY])
    assert code == 1
    assert "internal error: RuntimeError: simulated bug" in err
    assert "This is a bug in ftbc; please report it with the command line." in err
    assert not (tmp_path / "o").exists()


def test_exit_2_bad_input(tmp_path):
    code, _, err = run_cli([str(DIGITS_MODEL), "--data", "npz:nope.npz,nope2.npz",
                            "--out", str(tmp_path / "o"), *TINY])
    assert code == 2 and "nope.npz not found" in one_line_error(err)


@pytest.mark.lava
def test_exit_4_verification_mismatch(tmp_path, monkeypatch):
    """The exported file's first layer gets a different bias mantissa (in ftbc/, the part the
    Lava runner reads) right after it is written: real Lava then differs from the emulator,
    which simulates the graph the pipeline quantized. Exit 4; the report is kept."""
    real_write = exporters.netx.write_netx

    def write_then_corrupt(q, path):
        real_write(q, path)
        with h5py.File(path, "r+") as f:
            mant = f["ftbc/layers/0/bias_mant"]
            changed = np.full(mant.shape, 4095, dtype=mant.dtype)
            del f["ftbc/layers/0/bias_mant"]
            f["ftbc/layers/0/bias_mant"] = changed
    monkeypatch.setattr(exporters.netx, "write_netx", write_then_corrupt)
    out = tmp_path / "out"
    code, _, err = run_cli([str(DIGITS_MODEL), "--target", "loihi2-sim", "--out", str(out),
                            *TINY, "--verify-samples", "2"])
    assert code == 4, err
    line = one_line_error(err)
    assert "Lava differs from the emulator" in line and "'layer':" in line
    lava = json.loads((out / "report.json").read_text())["lava"]
    assert lava["spike_mismatches"] > 0 and lava["first_mismatch"]["sample"] == 0


def test_label_range_check():
    """toolchain.data.check_labels: labels must be class indices of the model's readout
    (the pipeline calls it once the number of outputs is known)."""
    from toolchain.data import check_labels, load_data
    split = load_data("digits")
    check_labels(split, 10)
    with pytest.raises(InputError, match="labels go up to 9 but the model has 5 outputs"):
        check_labels(split, 5)
