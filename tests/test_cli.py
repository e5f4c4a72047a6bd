"""The command line end to end: real model, real data, real Lava."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolchain.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "examples" / "digits_cnn.pt"
FAST = ["--timesteps", "4", "--calib-batches", "2", "--calib-batch-size", "64",
        "--iterations", "1", "--eval-samples", "120", "--no-progress"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolchain.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_help_documents_every_option_and_exit_code():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for option in ("--target", "--data", "--timesteps", "--threshold", "--threshold-scale",
                   "--alpha", "--calib-batches", "--calib-batch-size", "--iterations", "--holdout",
                   "--eval-samples", "--verify-samples", "--out", "--arch",
                   "--arch-kwargs", "--trust-pickle", "--input-shape", "--list-targets",
                   "--device", "--baselines", "--no-baselines"):
        assert option in proc.stdout
    for code in ("0  success", "2  unsupported", "3  hardware", "4  verification"):
        assert code in proc.stdout


def test_list_targets(capsys):
    assert main(["--list-targets"]) == 0
    out = capsys.readouterr().out
    assert "loihi2-sim" in out and "float" in out


def test_unknown_target_lists_valid_ones(capsys):
    assert main([str(DIGITS_MODEL), "--target", "tpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loihi2-sim" in err


def test_context_joins_the_first_line_and_keeps_the_problem_items():
    from core.errors import UnsupportedModelError
    exc = UnsupportedModelError(["aten::sub: a", "aten::div: b"])
    exc.add_context("traced on X")
    assert str(exc) == ("unsupported model: 2 problem(s); traced on X\n"
                        "  - aten::sub: a\n  - aten::div: b")
    assert exc.problems == ["aten::sub: a", "aten::div: b"] and exc.exit_code == 2


@pytest.mark.parametrize("target", ["loihi2", "float", "nir"])
def test_verify_samples_on_a_target_lava_does_not_run_is_one_line_exit_2(capsys, target):
    # Asked for a Lava verification that the target would skip: said, not silently ignored.
    assert main([str(DIGITS_MODEL), "--target", target, "--verify-samples", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--target loihi2-sim" in err and target in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu_is_one_line_exit_2(capsys):
    assert main([str(DIGITS_MODEL), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA GPU" in err


def test_missing_model_file_is_one_line_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftbc-export: error:") and err.count("\n") == 1


def test_bad_arch_kwargs(capsys):
    assert main([str(DIGITS_MODEL), "--arch-kwargs", "{oops"]) == 2


def test_corrupt_model_is_one_line_error_after_progress(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(DIGITS_MODEL.read_bytes()[:1000])
    assert main([str(bad)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert [l for l in lines if not l.startswith("[")] == [lines[-1]]
    assert lines[-1].startswith("ftbc-export: error:")


@pytest.mark.parametrize("form", ["scripted", "export"])
def test_a_model_for_other_inputs_than_the_data_names_the_data_and_the_fix(tmp_path, capsys,
                                                                           form):
    # The user forgot --data: a model for 2 x 6 x 6 inputs meets the default digits (1 x 8 x 8).
    from tests.models import Normalized
    model = Normalized().eval()
    path = tmp_path / ("model.pt" if form == "scripted" else "model.pt2")
    if form == "scripted":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        torch.export.save(torch.export.export(model, (torch.rand(2, 2, 6, 6),)), str(path))
    assert main([str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ftbc-export: error:")
    if form == "export":
        assert "exported for input (2, 2, 6, 6)" in err and "pass data of shape (2, 6, 6)" in err
    assert "; traced on the samples of data digits, shape (1, 8, 8): " in err
    assert "--data" in err and "cifar10:DIR" in err


@pytest.mark.lava
def test_end_to_end_digits_loihi2_sim(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(str(DIGITS_MODEL), "--target", "loihi2-sim", "--data", "digits",
                   "--out", str(out), "--verify-samples", "4", *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["ann_accuracy"] > 90
    assert set(report["snn_accuracy"]) == {"none", "lp", "ftbc"}
    assert all(len(acc) == 4 for acc in report["snn_accuracy"].values())
    assert len(report["fixed_accuracy"]) == 4
    assert set(report["snn_agreement"]) == {"none", "lp", "ftbc"}
    assert len(report["fixed_agreement"]) == 4
    assert "agree@T" in proc.stdout
    lava = report["lava"]
    assert lava["samples"] == 4
    assert lava["spike_mismatches"] == 0 and lava["readout_mismatches"] == 0
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "network.net").stat().st_size > 0
    assert "SNN float, ftbc" in proc.stdout


@pytest.mark.parametrize("target", ["loihi2-sim", "loihi2"])
def test_same_inputs_give_byte_identical_network(tmp_path, target):
    """network.net (and netlist.json where the target writes one) byte-identical; the
    report equal apart from timings and the command line (it names --out)."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main([str(DIGITS_MODEL), "--target", target, "--out", str(out),
                     "--verify-samples", "0", *FAST]) == 0
        outs.append(out)
    assert (outs[0] / "network.net").read_bytes() == (outs[1] / "network.net").read_bytes()
    reports = [json.loads((out / "report.json").read_text()) for out in outs]
    for r in reports:
        peaks = r.pop("peak_rss_mib")  # per stage, like the seconds
        assert set(peaks) == set(r.pop("seconds")) and min(peaks.values()) > 0
        r["provenance"].pop("command_line")
        r["calibration"] = {m: {k: v for k, v in c.items() if k != "seconds"}
                            for m, c in r["calibration"].items()}
        r["fixed_calibration"].pop("seconds")
    assert reports[0] == reports[1]
    assert reports[0]["device"] == "cpu"
    assert (outs[0] / "netlist.json").read_bytes() == (outs[1] / "netlist.json").read_bytes()


def test_no_baselines_deploys_the_same_network_and_skips_none_and_lp(tmp_path):
    """--no-baselines only drops the comparison: FTBC's network, its float and its fixed-point
    accuracy are those of a run with the baselines, byte for byte."""
    reports, nets = {}, {}
    for flag in ("--baselines", "--no-baselines"):
        out = tmp_path / flag
        assert main([str(DIGITS_MODEL), "--target", "loihi2", "--out", str(out),
                     "--verify-samples", "0", flag, *FAST]) == 0
        reports[flag] = json.loads((out / "report.json").read_text())
        nets[flag] = (out / "network.net").read_bytes()
    full, lean = reports["--baselines"], reports["--no-baselines"]
    assert set(full["snn_accuracy"]) == {"none", "lp", "ftbc"}
    assert set(lean["snn_accuracy"]) == set(lean["calibration"]) == {"ftbc"}
    assert lean["snn_accuracy"]["ftbc"] == full["snn_accuracy"]["ftbc"]
    assert lean["fixed_accuracy"] == full["fixed_accuracy"]
    assert nets["--no-baselines"] == nets["--baselines"]


def test_calibration_defaults_agree_everywhere():
    """The calibration's defaults are written once, in CalibrationOptions; the CLI, the
    pipeline's Options and the signatures of calibrate and calibrate_fixed take them from
    there. A literal copy that drifts would make the library and the command line calibrate
    differently, so the settings the pipeline hands the calibration, built from the CLI's
    defaults through the real wiring (``options_from_args``, ``_calibration_settings``) and
    from ``Options``'s own, are compared with CalibrationOptions and both signatures."""
    import dataclasses
    import inspect

    from toolchain.calibrate import calibrate
    from toolchain.calibrate_fixed import calibrate_fixed
    from toolchain.calibration import CalibrationOptions
    from toolchain.cli import build_parser, options_from_args
    from toolchain.pipeline import Options, _calibration_settings

    args = build_parser().parse_args([str(DIGITS_MODEL)])
    from_cli = _calibration_settings(options_from_args(args, []))
    from_options = _calibration_settings(Options(model=str(DIGITS_MODEL)))
    library = {f.name: f.default for f in dataclasses.fields(CalibrationOptions)}
    signatures = {fn.__name__: inspect.signature(fn).parameters
                  for fn in (calibrate, calibrate_fixed)}
    # what a terminal session shows or runs on is not a calibration default
    chosen = set(from_cli) - {"progress", "device"}
    assert chosen == set(library) - {"method", "progress", "device"}
    for keyword in sorted(chosen):
        value = library[keyword]
        assert from_cli[keyword] == value, ("CLI", keyword, from_cli[keyword], value)
        assert from_options[keyword] == value, ("Options", keyword, from_options[keyword])
        for name, parameters in signatures.items():
            assert parameters[keyword].default == value, (name, keyword)
