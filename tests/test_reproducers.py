"""The defects a hostile new user found (issue 15's reproducers), one test each: a clear
one-line error with the right exit code, or the correct result. Reproducers 1 (input range),
5 (memory), 7 and the interrupts are in ``test_encoding.py``, ``test_signals.py``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from tests.fuzz_cases import TINY, run_cli
from tests.test_faults import DIGITS_MODEL, ROOT, assert_intact, one_line_error, snapshot
from toolchain.load import load_model


def _script(model: nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def test_2_single_linear_model_runs_with_fixed_point_calibration(tmp_path):
    torch.manual_seed(0)
    model = _script(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "lin.pt")
    code, _, err = run_cli([str(model), "--target", "loihi2", "--out", str(tmp_path / "o"),
                            *TINY, "--no-progress"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "fixed_calibration" in report and len(report["fixed_accuracy"]) == 2


class _Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        return self.f(x)


@pytest.mark.parametrize("shape", [[], ["--input-shape", "1,8,8"]], ids=["data", "option"])
def test_3_export_with_a_dynamic_batch_dimension(tmp_path, shape):
    batch = torch.export.Dim("batch", min=2, max=1024)
    program = torch.export.export(_Mlp().eval(), (torch.zeros(4, 1, 8, 8),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(tmp_path / "dyn.pt2"))
    code, _, err = run_cli([str(tmp_path / "dyn.pt2"), "--target", "float",
                            "--out", str(tmp_path / "o"), *TINY, "--no-progress", *shape])
    assert code == 0, err


def _cli_with_file_size_limit(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """The CLI in a child whose files cannot grow beyond 20,000 bytes (RLIMIT_FSIZE: the
    kernel refuses the write, as a full disk would; SIGXFSZ ignored so the write fails)."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
            "from toolchain.cli import main\n"
            f"sys.exit(main({args!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_4_file_too_large_while_writing_the_network_is_one_line(tmp_path):
    """A real write failure inside network.net: exit 2, one line, nothing left in --out."""
    out = tmp_path / "out"
    proc = _cli_with_file_size_limit([str(DIGITS_MODEL), "--out", str(out), "--target",
                                      "loihi2", *TINY, "--no-progress"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot write outputs" in one_line_error(proc.stderr)
    assert "File too large" in one_line_error(proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_4b_a_full_temporary_directory_during_calibration_is_one_line(tmp_path):
    """The calibration caches spike trains in anonymous files under TMPDIR; a write that
    fails there is exit 2 with one line naming the directory and the fix, and nothing is
    left in --out or in TMPDIR."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    proc = _cli_with_file_size_limit(
        [str(DIGITS_MODEL), "--out", str(out), "--target", "loihi2", *TINY,
         "--calib-batch-size", "64", "--timesteps", "4", "--no-progress"], TMPDIR=str(tmp))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert f"temporary directory {tmp}" in line and "TMPDIR" in line, line
    assert "File too large" in line and "Traceback" not in proc.stderr
    assert not out.exists() and os.listdir(tmp) == []


def test_6_a_run_commits_exactly_its_own_outputs(tmp_path):
    out = tmp_path / "o"
    args = [str(DIGITS_MODEL), "--out", str(out), *TINY, "--no-progress"]
    assert run_cli([*args, "--target", "loihi2-sim"])[0] == 0
    assert {"network.net", "netlist.json"} <= set(os.listdir(out))
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli([*args, "--target", "float", "--timesteps", "3"])
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["accuracy.png", "notes.txt", "report.json"]
    assert json.loads((out / "report.json").read_text())["target"] == "float"


def test_8_empty_out_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli([str(DIGITS_MODEL), "--out", "", *TINY])
    assert code == 2 and "--out: empty path" in err
    assert os.listdir(tmp_path) == []


def test_9_an_input_named_like_an_output_in_out_is_never_overwritten(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    model = out / "report.json"
    model.write_bytes(DIGITS_MODEL.read_bytes())
    before = snapshot(out)
    code, _, err = run_cli([str(model), "--out", str(out), *TINY, "--no-progress"])
    assert code == 2 and "would be overwritten" in one_line_error(err)
    assert_intact(out, before)


@pytest.mark.parametrize("model, says", [
    ("DIR", "is a directory"), ("/dev/null", "is not a regular file"),
    ("/dev/zero", "is not a regular file"), ("MISSING", "not found")])
def test_10_model_path_messages(tmp_path, model, says):
    path = {"DIR": str(tmp_path), "MISSING": str(tmp_path / "nope.pt")}.get(model, model)
    code, _, err = run_cli([path, "--out", str(tmp_path / "o"), *TINY])
    assert code == 2 and says in one_line_error(err)


def test_10_mnist_given_a_file_says_so(tmp_path):
    code, _, err = run_cli([str(DIGITS_MODEL), "--data", f"mnist:{DIGITS_MODEL}",
                            "--out", str(tmp_path / "o"), *TINY])
    assert code == 2 and "is a file; mnist:DIR needs the directory" in one_line_error(err)


def test_10_torchscript_named_onnx_loads_as_torchscript(tmp_path):
    path = _script(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), tmp_path / "m.onnx")
    assert load_model(path).kind == "torchscript"


def test_10_three_d_output_names_its_shape(tmp_path):
    class ThreeD(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(8, 10)

        def forward(self, x):
            return self.l(x.squeeze(1))
    code, _, err = run_cli([str(_script(ThreeD(), tmp_path / "m.pt")),
                            "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    assert "model output: has shape (2, 8, 10), not (N, classes)" in err
    assert "not produced by a Linear layer" not in err


def _absurd_weights(tmp_path: Path) -> Path:
    """The digits CNN with its first conv's weights x 1e30."""
    model = torch.jit.load(str(DIGITS_MODEL))
    with torch.no_grad():
        next(iter(model.parameters())).mul_(1e30)
    path = tmp_path / "big.pt"
    torch.jit.save(model, str(path))
    return path


def test_10_absurd_weights_are_one_true_violation_without_warnings(tmp_path):
    code, _, err = run_cli([str(_absurd_weights(tmp_path)), "--target", "loihi2",
                            "--out", str(tmp_path / "o"), *TINY, "--no-progress"])
    assert code == 3, err
    lines = err.strip().splitlines()
    assert lines[-2].endswith("1 violation(s)") and "RuntimeWarning" not in err
    value = float(lines[-1].split("weight = ")[1].split()[0])
    assert value > 1e20 and "absurdly large" in lines[-1]  # not a NaN cast to -9.2e18


def test_11_report_is_strict_json_with_absurd_weights(tmp_path):
    path = _absurd_weights(tmp_path)
    out = tmp_path / "o"
    code, _, err = run_cli([str(path), "--target", "float", "--out", str(out), *TINY,
                            "--no-progress"])
    assert code == 0, err

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    json.loads((out / "report.json").read_text(), parse_constant=refuse)
