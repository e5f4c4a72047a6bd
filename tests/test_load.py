"""toolchain.load: every format, every refusal, and no code from a pickle before consent."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from core.errors import InputError
from tests.models import MarkerPayload, TinyNet
from toolchain.load import LoadedModel, inspect_archive, load_model, pickle_globals

ARCH = "tests.models:TinyNet"
X = torch.rand(3, 4)


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny: TinyNet) -> dict[str, Path]:
    """The same model in every format."""
    root = tmp_path_factory.mktemp("models")
    paths = {k: root / f"{k}.pt" for k in ("scripted", "traced", "state", "full", "ckpt")}
    paths["export"] = root / "export.pt2"
    torch.jit.save(torch.jit.script(tiny), str(paths["scripted"]))
    torch.jit.save(torch.jit.trace(tiny, X), str(paths["traced"]))
    torch.export.save(torch.export.export(tiny, (X,)), str(paths["export"]))
    torch.save(tiny.state_dict(), paths["state"])
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, paths["ckpt"])
    torch.save(tiny, paths["full"])
    return paths


def _same_outputs(loaded: LoadedModel, tiny: TinyNet) -> None:
    fn = loaded.obj.module() if loaded.kind == "export" else loaded.obj
    assert torch.equal(fn(X), tiny(X))


@pytest.mark.parametrize("name, kind", [("scripted", "torchscript"), ("traced", "torchscript"),
                                        ("export", "export")])
def test_archives(files: dict, tiny: TinyNet, name: str, kind: str) -> None:
    loaded = load_model(files[name])
    assert loaded.kind == kind and loaded.path == files[name]
    if kind == "torchscript":
        assert isinstance(loaded.obj, torch.jit.ScriptModule) and not loaded.obj.training
    else:
        assert isinstance(loaded.obj, torch.export.ExportedProgram)
    _same_outputs(loaded, tiny)


@pytest.mark.parametrize("name", ["state", "ckpt"])
def test_state_dict_with_arch(files: dict, tiny: TinyNet, name: str) -> None:
    loaded = load_model(files[name], arch=ARCH, arch_kwargs={"hidden": 5})
    assert loaded.kind == "module" and isinstance(loaded.obj, TinyNet)
    assert not loaded.obj.training
    _same_outputs(loaded, tiny)


def test_state_dict_needs_arch(files: dict) -> None:
    assert inspect_archive(files["state"]).unsafe_globals == ()
    with pytest.raises(InputError, match=r"holds a state_dict .*pass --arch package.module:Class"):
        load_model(files["state"])


@pytest.mark.parametrize("arch, kwargs, message", [
    ("TinyNet", None, "must look like package.module:ClassName"),
    ("no_such_pkg.models:Net", None, "cannot import module 'no_such_pkg.models'"),
    ("tests.models:NoSuchNet", None, "has no nn.Module class 'NoSuchNet'"),
    ("tests.models:build_after_marker", None, "has no nn.Module class 'build_after_marker'"),
    (ARCH, {"depth": 3}, "cannot load arch tests.models:TinyNet: .*unexpected keyword"),
    (ARCH, {"hidden": 6}, r"does not fit tests.models:TinyNet: shape mismatch fc1.weight "
                          r"file \(5, 4\) vs model \(6, 4\)"),
    ("tests.models:SmallCnn", None, "missing keys mean, std, features.0.weight.*"
                                    "unexpected keys fc1.weight, fc1.bias, fc2.weight, fc2.bias"),
])
def test_bad_arch(files: dict, arch: str, kwargs: dict | None, message: str) -> None:
    with pytest.raises(InputError, match=message) as err:
        load_model(files["state"], arch=arch, arch_kwargs=kwargs)
    assert "\n" not in str(err.value)


def test_pickled_module_needs_trust(files: dict, tiny: TinyNet) -> None:
    with pytest.raises(InputError, match=r"imports tests.models.TinyNet.*arbitrary code.*"
                                         r"--trust-pickle"):
        load_model(files["full"])
    loaded = load_model(files["full"], trust_pickle=True)
    assert loaded.kind == "module" and not loaded.obj.training
    _same_outputs(loaded, tiny)


def test_no_code_runs_before_consent(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    path = tmp_path / "payload.pt"
    torch.save(MarkerPayload(str(marker)), path)
    with pytest.raises(InputError, match="tests.models.build_after_marker.*--trust-pickle"):
        load_model(path)
    assert not marker.exists()
    loaded = load_model(path, trust_pickle=True)
    assert marker.exists() and isinstance(loaded.obj, TinyNet)


def test_pickle_globals_reads_opcodes_only(tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    for protocol in (2, 4):
        data = pickle.dumps(MarkerPayload(str(marker)), protocol=protocol)
        assert pickle_globals(data) == {"tests.models.build_after_marker"}
    assert not marker.exists()


def _damaged(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("name", ["scripted", "state", "export"])
@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_damaged_archives(files: dict, tmp_path: Path, name: str, how: str) -> None:
    path = _damaged(files[name], tmp_path / f"{how}.pt", how)
    with pytest.raises(InputError, match="corrupt") as err:
        load_model(path, arch=ARCH)
    assert "\n" not in str(err.value)


def test_not_a_model_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a model\n")
    with pytest.raises(InputError, match="not a PyTorch model file"):
        load_model(text)
    with pytest.raises(InputError, match="model file .*missing.pt not found"):
        load_model(tmp_path / "missing.pt")
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy"):
        load_model(legacy)
