"""Load a trained model file without running code from it unless the user consents.

Formats (detected from the zip layout, never by unpickling)::

    TorchScript  (torch.jit.save)       */constants.pkl, */code/...   -> torch.jit.load
    torch.export (torch.export.save)    */archive_format, */models/   -> torch.export.load
    state_dict   (torch.save(m.state_dict()))  */data.pkl whose pickle only names the globals
                 ``torch.load(weights_only=True)`` allows   -> weights_only load + ``arch`` class
    pickled module (torch.save(model))  */data.pkl naming other classes -> refused unless
                 ``trust_pickle`` (unpickling imports and runs code named by the file)
    ONNX         (torch.onnx.export, ...) a ``.onnx`` file, or any non-zip file starting with
                 the ModelProto ``ir_version`` tag -> ``onnx.load`` + ``onnx.checker`` (protobuf
                 only: nothing is run)

``pickle_globals`` lists the globals a pickle would import by walking its opcodes with
``pickletools.genops`` (nothing is executed). torch.export archives can hold pickles too
(pickled weights, custom objects, sample inputs) that ``torch.export.load`` unpickles with
``weights_only=False``: those are checked the same way. Every failure is a one-line
``InputError``.
"""
from __future__ import annotations

import _compat_pickle
import importlib
import io
import json
import logging
import pickletools
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import InputError

KINDS = ("torchscript", "export", "module", "onnx")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model")
_ZIP_TAG = b"PK\x03\x04"
_ONNX_TAG = b"\x08"  # protobuf field 1 (ModelProto.ir_version, varint): every ONNX file's start


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model in eval mode: ``obj`` is a ``torch.jit.ScriptModule`` (kind
    "torchscript"), a ``torch.export.ExportedProgram`` ("export"), an ``nn.Module``
    ("module") or an ``onnx.ModelProto`` ("onnx")."""
    kind: str
    obj: Any
    path: Path


@dataclass(frozen=True)
class ArchiveInfo:
    """What a torch zip archive holds: ``kind`` in {"torchscript", "export", "pickle"} and the
    globals outside the weights_only allow-list its pickles would import (empty = safe)."""
    kind: str
    unsafe_globals: tuple[str, ...]


# --------------------------------------------------------------------------- pickle scan

def _allowed_globals() -> set[str]:
    """The "module.name" globals ``torch.load(weights_only=True)`` accepts."""
    from torch import _weights_only_unpickler as wou
    return set(wou._get_allowed_globals()) | set(wou._get_user_allowed_globals())


def _global_name(module: str, name: str) -> str:
    """Python-2 style names (``__builtin__ set``) mapped as the unpickler maps them."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def pickle_globals(data: bytes) -> set[str]:
    """Every global (class or function) the pickle ``data`` would import, found by walking
    its opcodes; a STACK_GLOBAL whose operands cannot be followed is reported as "?"."""
    found, strings, memo = set(), [], {}
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("GLOBAL", "INST"):
            found.add(_global_name(*arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.add(_global_name(*strings[-2:]) if len(strings) >= 2 else "?")
        elif op.name in _STRING_OPS:
            strings.append(arg)
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE") and strings:
            memo[len(memo) if op.name == "MEMOIZE" else arg] = strings[-1]
        elif op.name in ("GET", "BINGET", "LONG_BINGET") and arg in memo:
            strings.append(memo[arg])
    return found


def _unsafe(data: bytes, where: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(pickle_globals(data) - _allowed_globals()))
    except (ValueError, IndexError, TypeError, UnicodeDecodeError) as err:
        raise InputError(f"{where}: corrupt pickle ({err})") from None


def _unsafe_torch_save(data: bytes, where: str) -> tuple[str, ...]:
    """Unsafe globals of a nested torch.save payload (zip with data.pkl, or a raw pickle)."""
    if not data.startswith(b"PK"):
        return _unsafe(data, where)
    with zipfile.ZipFile(io.BytesIO(data)) as inner:
        pkls = [n for n in inner.namelist() if n.endswith("data.pkl")]
        return tuple(g for n in pkls for g in _unsafe(inner.read(n), where))


# --------------------------------------------------------------------------- archive layout

def _open_archive(path: Path) -> zipfile.ZipFile:
    """The file as a verified zip archive (every member's CRC checked)."""
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        archive = zipfile.ZipFile(path)
        bad = archive.testzip()
    except _ZIP_ERRORS as err:
        if head.startswith(b"PK"):
            raise InputError(f"{path}: corrupt or truncated model archive ({err})") from None
        if head.startswith(b"\x80"):
            raise InputError(f"{path}: legacy (non-zip) torch.save file: re-save it with a "
                             "current PyTorch (torch.save, torch.jit.save or torch.export.save)")
        raise InputError(f"{path}: not a PyTorch model file (expected a TorchScript, "
                         "torch.export or torch.save zip archive)") from None
    if bad is not None:
        raise InputError(f"{path}: corrupt model archive (member {bad} fails its CRC check)")
    return archive


def _members(archive: zipfile.ZipFile) -> dict[str, str]:
    """Member names without the archive's top folder -> full names."""
    return {n.split("/", 1)[1]: n for n in archive.namelist() if "/" in n}


def _export_pickles(archive: zipfile.ZipFile, members: dict[str, str]) -> list[str]:
    """Members of a torch.export archive that ``torch.export.load`` would unpickle."""
    names = [m for m in members if m.startswith("data/sample_inputs/")
             or (m.endswith(".pt") and m.count("/") == 2)]
    for config in (m for m in members if m.endswith("_config.json")):
        folder = config.rsplit("/", 1)[0]
        for meta in json.loads(archive.read(members[config]))["config"].values():
            if meta.get("use_pickle") or not meta["path_name"].startswith(("weight", "tensor")):
                names.append(f"{folder}/{meta['path_name']}")
    return [m for m in names if m in members]


# What a damaged archive makes zipfile/json raise (NotImplementedError: unknown zip version
# or compression; UnicodeDecodeError: json of non-UTF bytes; KeyError/TypeError/
# AttributeError: a config of the wrong shape).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
               NotImplementedError)
_LAYOUT_ERRORS = _ZIP_ERRORS + (KeyError, TypeError, AttributeError)


def inspect_archive(path: Path) -> ArchiveInfo:
    """Classify a model file by its zip layout and scan its pickles (nothing is run)."""
    with _open_archive(path) as archive:
        try:
            return _classify(path, archive)
        except InputError:
            raise
        except _LAYOUT_ERRORS as err:  # json.JSONDecodeError, UnicodeDecodeError: ValueError
            raise InputError(f"{path}: corrupt model archive ({type(err).__name__}: "
                             f"{_first_line(err)})") from None


def _check_one_folder(path: Path, archive: zipfile.ZipFile) -> None:
    """A torch.export archive keeps every member in one top folder. Refuse anything else:
    when its reader fails, ``torch.export.load`` falls back to the pre-2.8 layout (top-level
    ``version``, ``serialized_state_dict.pt``, ...), whose loader retries ``torch.load`` with
    ``weights_only=False``, i.e. runs code from the file; those members are outside the
    folder this module scans."""
    names = archive.namelist()
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) != 1 or any("/" not in n for n in names):
        raise InputError(f"{path}: torch.export archive with members outside its top folder "
                         "(an old or hand-made layout whose loader can run code from the "
                         "file): refused; re-save it with torch.export.save")


def _classify(path: Path, archive: zipfile.ZipFile) -> ArchiveInfo:
    """``inspect_archive`` on an opened, CRC-checked archive."""
    members = _members(archive)
    if "constants.pkl" in members or any(m.startswith("code/") for m in members):
        return ArchiveInfo("torchscript", ())
    if "archive_format" in members or any(m.startswith("models/") for m in members):
        _check_one_folder(path, archive)
        unsafe = [g for m in _export_pickles(archive, members)
                  for g in _unsafe_torch_save(archive.read(members[m]), f"{path}:{m}")]
        return ArchiveInfo("export", tuple(sorted(set(unsafe))))
    if "data.pkl" in members:
        return ArchiveInfo("pickle", _unsafe(archive.read(members["data.pkl"]), str(path)))
    raise InputError(f"{path}: zip archive without a PyTorch layout (no data.pkl, code/ or "
                     "archive_format): not a model file")


# --------------------------------------------------------------------------- loaders

def _refuse_pickle(path: Path, unsafe: tuple[str, ...]) -> InputError:
    shown = ", ".join(unsafe[:3]) + (f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else "")
    return InputError(
        f"{path} is a pickled Python object that imports {shown}: unpickling it runs arbitrary "
        "code from the file, so it was not opened; pass --trust-pickle only if you trust its "
        "source, or save the model as TorchScript (torch.jit.save) or as a state_dict with "
        "--arch")


class _quiet_loggers:
    """Silence loggers for a block (torch.export logs whole tracebacks for a corrupt file;
    the one-line InputError says it all)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self) -> None:
        self.saved = [lg.disabled for lg in self.loggers]
        for lg in self.loggers:
            lg.disabled = True

    def __exit__(self, *exc: Any) -> None:
        for lg, was in zip(self.loggers, self.saved):
            lg.disabled = was


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _guarded(path: Path, what: str, fn: Callable[[], Any]) -> Any:
    """Run a torch loader, turning any failure into a one-line InputError."""
    try:
        return fn()
    except InputError:
        raise
    except Exception as err:  # torch raises many types for bad files
        raise InputError(f"{path}: cannot load {what}: {_first_line(err)}") from None


def _import_arch(arch: str) -> type:
    """``package.module:ClassName`` -> the class (an nn.Module subclass)."""
    module_name, sep, class_name = arch.partition(":")
    if not sep or not module_name or not class_name.isidentifier():
        raise InputError(f"--arch {arch!r} must look like package.module:ClassName")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise InputError(f"--arch {arch!r}: cannot import module {module_name!r} "
                         f"({_first_line(err)})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InputError(f"--arch {arch!r}: module {module_name!r} has no nn.Module class "
                         f"{class_name!r}")
    return cls


def _short(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _mismatch(model: torch.nn.Module, state: dict[str, Any]) -> list[str]:
    """Missing, unexpected and shape-mismatched keys of ``state`` for ``model``."""
    own = model.state_dict()
    parts = []
    if missing := [k for k in own if k not in state]:
        parts.append(f"missing keys {_short(missing)}")
    if unexpected := [k for k in state if k not in own]:
        parts.append(f"unexpected keys {_short(unexpected)}")
    shapes = [f"{k} file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape")
              and tuple(state[k].shape) != tuple(own[k].shape)]
    if shapes:
        parts.append(f"shape mismatch {_short(shapes)}")
    return parts


def _state_dict_of(obj: Any, path: Path) -> dict[str, Any]:
    """The state_dict in a loaded object (also inside a {"state_dict": ...} checkpoint)."""
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in _CHECKPOINT_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return _state_dict_of(obj[key], path)
    raise InputError(f"{path}: holds a {type(obj).__name__}, not a model or a state_dict")


def _build(path: Path, state: dict[str, Any], arch: str | None,
           arch_kwargs: dict | None) -> torch.nn.Module:
    """Instantiate ``arch`` and load ``state`` into it strictly."""
    if arch is None:
        raise InputError(f"{path} holds a state_dict (weights only): pass --arch "
                         "package.module:ClassName (and --arch-kwargs JSON) to say which model")
    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        raise InputError(f"--arch-kwargs must be a JSON object, got {arch_kwargs!r}")
    cls = _import_arch(arch)
    model = _guarded(path, f"arch {arch}", lambda: cls(**(arch_kwargs or {})))
    if problems := _mismatch(model, state):
        raise InputError(f"{path}: state_dict does not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def _load_torchscript(path: Path, info: ArchiveInfo, **_: Any) -> LoadedModel:
    model = _guarded(path, "TorchScript archive", lambda: torch.jit.load(str(path), "cpu"))
    return LoadedModel("torchscript", model.eval(), path)


def _load_export(path: Path, info: ArchiveInfo, trust_pickle: bool, **_: Any) -> LoadedModel:
    if info.unsafe_globals and not trust_pickle:
        raise _refuse_pickle(path, info.unsafe_globals)
    with _quiet_loggers("torch.export", "torch._export"):  # they log tracebacks on bad files
        program = _guarded(path, "torch.export archive", lambda: torch.export.load(str(path)))
    return LoadedModel("export", program, path)


def _load_pickle(path: Path, info: ArchiveInfo, trust_pickle: bool, arch: str | None,
                 arch_kwargs: dict | None) -> LoadedModel:
    if info.unsafe_globals and not trust_pickle:
        raise _refuse_pickle(path, info.unsafe_globals)
    safe = not info.unsafe_globals
    obj = _guarded(path, "torch.save file",
                   lambda: torch.load(path, map_location="cpu", weights_only=safe))
    if not isinstance(obj, torch.nn.Module):
        obj = _build(path, _state_dict_of(obj, path), arch, arch_kwargs)
    return LoadedModel("module", obj.eval(), path)


def is_onnx(path: Path) -> bool:
    """A file that starts like a serialized ONNX ModelProto, or a ``.onnx`` file that is
    not a zip archive (TorchScript, torch.save and .pt2 files are zips, whatever their
    name: they go to the archive loaders, not the ONNX parser)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == _ONNX_TAG or (path.suffix.lower() == ".onnx" and head != _ZIP_TAG)


def check_model_file(path: Path) -> None:
    """A one-line ``InputError`` unless ``path`` is a readable regular file (a directory or
    a device is named as such, not as "not found")."""
    if not path.exists():
        raise InputError(f"model file {path} not found")
    if path.is_dir():
        raise InputError(f"model file {path} is a directory, not a model file")
    if not path.is_file():
        raise InputError(f"model file {path} is not a regular file (a device, pipe or "
                         "socket); give the saved model file")


def load_onnx(path: Path) -> LoadedModel:
    """Parse and check an ONNX model (with its external data, if any)."""
    import onnx  # only ONNX inputs need it
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf's DecodeError, missing external data, ...
        raise InputError(f"{path}: corrupt or truncated ONNX file ({_first_line(err)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # ValidationError, or the checker's own failures
        raise InputError(f"{path}: corrupt or invalid ONNX model ({_first_line(err)})") from None
    return LoadedModel("onnx", model, path)


LOADERS: dict[str, Callable[..., LoadedModel]] = {
    "torchscript": _load_torchscript, "export": _load_export, "pickle": _load_pickle}


def load_model(path: str | Path, *, arch: str | None = None, arch_kwargs: dict | None = None,
               trust_pickle: bool = False) -> LoadedModel:
    """Load ``path`` (TorchScript, torch.export, state_dict + ``arch``, ONNX, or, with
    ``trust_pickle``, a pickled nn.Module). Raises a one-line ``InputError`` on any problem."""
    path = Path(path)
    check_model_file(path)
    if is_onnx(path):
        return load_onnx(path)
    info = inspect_archive(path)
    return LOADERS[info.kind](path, info, trust_pickle=trust_pickle, arch=arch,
                              arch_kwargs=arch_kwargs)
