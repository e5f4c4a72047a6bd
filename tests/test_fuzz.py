"""Fuzzing, short run (the long run is ``bench/fuzz.py``): damaged model files, ``.net``
files, data files and random CLI argument combinations must each end in success or a
documented one-line error (``FtbcError`` / exit 2, 3, 4), never an unhandled exception or
exit 1. Cases come from ``tests/fuzz_cases.py``; hypothesis picks the case seeds
(derandomized, no example database, so CI runs are reproducible: a failing seed reruns with
``bench/fuzz.py --kind KIND --first SEED --cases 1``).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InputError
from tests.fuzz_cases import (DIGITS_MODEL, TINY, Failure, check_cli, make_seeds, outcome,
                              run_case, run_cli)
from toolchain.data import load_data
from toolchain.load import load_model

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("fuzz"))


@settings(FUZZ, max_examples=150)
@given(seed=SEEDS)
def test_fuzz_model_files(seeds, seed):
    run_case("model", seed, seeds)


@settings(FUZZ, max_examples=80)
@given(seed=SEEDS)
def test_fuzz_net_files(seeds, seed):
    run_case("net", seed, seeds)


@settings(FUZZ, max_examples=150)
@given(seed=SEEDS)
def test_fuzz_data_files(seeds, seed):
    run_case("data", seed, seeds)


@settings(FUZZ, max_examples=40)
@given(seed=SEEDS)
def test_fuzz_cli_arguments(seeds, seed):
    run_case("cli", seed, seeds)


def test_harness_catches_what_it_should():
    assert outcome(lambda: None) == "ok"
    with pytest.raises(Failure, match="unhandled KeyError"):
        outcome(lambda: {}["x"])
    with pytest.raises(Failure, match="not one line"):
        outcome(lambda: (_ for _ in ()).throw(InputError("two\nlines")))
    with pytest.raises(Failure, match="exit code 1"):
        check_cli(1, "ftbc-export: internal error: boom\n")
    assert check_cli(2, "[1/11] load\nftbc-export: error: bad\n") == "exit:2"


# --------------------------------------------------------------------------- regressions
# Each found by the fuzzer (or by reading what the fuzzer reached) and fixed.

def test_legacy_export_layout_runs_no_code(seeds, tmp_path):
    """torch.export.load falls back to the pre-2.8 layout when its reader fails, and that
    loader retries torch.load(weights_only=False) on serialized_state_dict.pt: a hand-made
    archive ran code without --trust-pickle. Now refused before torch sees it."""
    from tests.models import MarkerPayload
    from torch._export.serde.schema import SCHEMA_VERSION
    marker = tmp_path / "marker.txt"
    payload = io.BytesIO()
    torch.save(MarkerPayload(str(marker)), payload)
    src = zipfile.ZipFile(seeds.models["export"])
    program = next(n for n in src.namelist() if n.endswith("models/model.json"))
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", src.read(program))
        z.writestr("serialized_state_dict.pt", payload.getvalue())
        z.writestr("serialized_constants.pt", b"")
        z.writestr("serialized_example_inputs.pt", b"")
        z.writestr("x/archive_format", b"pt2")
    with pytest.raises(InputError, match="outside its top folder"):
        load_model(evil)
    assert not marker.exists()


def _rewrite_member(src: Path, dst: Path, name_end: str, body: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = body if info.filename.endswith(name_end) else zin.read(info.filename)
            zout.writestr(info.filename, data)
    return dst


@pytest.mark.parametrize("body", [b'{"config": ', b"\xff\xfe\x00bad", b'{"config": 3}',
                                  b"[1, 2]"])
def test_export_archive_with_broken_config(seeds, tmp_path, body):
    path = _rewrite_member(seeds.models["export"], tmp_path / "m.pt2",
                           "model_weights_config.json", body)
    with pytest.raises(InputError, match="corrupt model archive") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_zip_with_unsupported_compression(seeds, tmp_path):
    data = bytearray(seeds.models["state"].read_bytes())
    first = data.index(b"PK\x03\x04")
    data[first + 8:first + 10] = (99).to_bytes(2, "little")   # compression method 99
    central = data.index(b"PK\x01\x02")
    data[central + 10:central + 12] = (99).to_bytes(2, "little")
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(data))
    assert outcome(lambda: load_model(path)) == "error:InputError"


def test_scalar_labels(tmp_path):
    for name in ("a", "b"):
        np.savez(tmp_path / f"{name}.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.int64(3))
    with pytest.raises(InputError, match="labels y must be 1-D"):
        load_data(f"npz:{tmp_path / 'a.npz'},{tmp_path / 'b.npz'}")


def test_npz_needing_a_newer_zip_version(tmp_path):
    """Found by atheris: zipfile raises NotImplementedError for a member that needs zip
    version > 6.3."""
    np.savez(tmp_path / "a.npz", x=np.zeros((3, 1, 8, 8), np.float32), y=np.arange(3))
    data = bytearray((tmp_path / "a.npz").read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 6:central + 8] = (255).to_bytes(2, "little")   # version needed: 25.5
    (tmp_path / "a.npz").write_bytes(bytes(data))
    with pytest.raises(InputError, match="not a readable .npz file"):
        load_data(f"npz:{tmp_path / 'a.npz'},{tmp_path / 'a.npz'}")


def test_netx_view_type_of_wrong_kind(seeds, tmp_path):
    from exporters.netx import read_netx
    path = tmp_path / "n.net"
    path.write_bytes(seeds.nets["dense"].read_bytes())
    with h5py.File(path, "r+") as f:
        del f["layer/1/type"]
        f["layer/1/type"] = np.float64(2.0)
    with pytest.raises(InputError, match="type must be a string"):
        read_netx(path)


@pytest.mark.parametrize("option, value", [
    ("--seed", "-1"), ("--alpha", "nan"), ("--alpha", "inf"), ("--verify-samples", "-2"),
    ("--timesteps", "0"), ("--holdout", "nan"), ("--threshold-scale", "0"),
    ("--threshold-scale", "nan")])
def test_invalid_option_values_are_usage_errors(option, value):
    code, _, err = run_cli([str(DIGITS_MODEL), *TINY, option, value])
    assert code == 2 and f"argument {option}" in err and "Traceback" not in err


def test_deeply_nested_arch_kwargs(tmp_path):
    code, _, err = run_cli([str(DIGITS_MODEL), *TINY, "--out", str(tmp_path / "o"),
                            "--arch-kwargs", "[" * 100000])
    assert code == 2 and "--arch-kwargs is not valid JSON" in err.strip().splitlines()[-1]


def test_list_targets_and_help_in_process():
    assert run_cli(["--list-targets"])[0] == 0
    code, out, _ = run_cli(["--help"])
    assert code == 0 and "130/143" in out
