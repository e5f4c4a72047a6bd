"""Resumable runs (``--resume``): a checkpoint after every stage, so that a run stopped
part-way (Ctrl-C, a scheduler's SIGTERM, a machine going down) continues where it stopped
when the same command is run again.

The checkpoint is a folder (``OUT/.ftbc-resume`` for the CLI) holding ``state.pkl``: the run
after its last finished stage, minus what the first stages make again each time (the data,
the loaded model, the calibration draw). Inside the two long stages, calibrate and simulate,
each method's result is kept as soon as it is done (``part-<stage>-<method>.pkl``), and the
seconds it took are added to its stage's time when it is reused. Every file is written to a
temporary name and renamed into place: a kill never leaves half a checkpoint.

A checkpoint is used only by a run that computes the same thing: its key covers every option
that changes a result, the converted model (the traced ANN, weights included), the data and
calibration images, ftbc's own source code and the torch / numpy versions. Any difference, or
a checkpoint that cannot be read, and the run starts afresh and says so. The files are
pickles: only ever read back from a folder the user's own runs wrote.
"""
from __future__ import annotations

import hashlib
import pickle
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from sims.progress import stderr_line

FOLDER = ".ftbc-resume"
STATE = "state.pkl"
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "hw_targets", "exporters", "sims", "toolchain")
# Options that change no checkpointed result: where outputs go, how the run shows its
# progress, and the Lava verification (after the last checkpoint, always run again). The
# model file is keyed by what was traced from it, not by its path.
NOT_IN_KEY = frozenset({"model", "out", "progress", "verify_samples", "verify_workers",
                        "command_line", "resume"})
# Run fields the first stages remake on every run (large, and not needed in the checkpoint).
REMADE = frozenset({"options", "data", "calib", "loaded", "store"})


def digest(obj: Any, h: Any) -> None:
    """Feed a canonical byte form of an IR object (dataclasses, arrays, mappings, sequences,
    scalars) into the hash ``h``: equal objects give equal bytes whatever their memory
    layout or the order their mappings were built in."""
    if is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"<{type(obj).__qualname__}>".encode())
        for f in fields(obj):
            h.update(f.name.encode())
            digest(getattr(obj, f.name), h)
    elif isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        h.update(f"<array {arr.dtype.str} {arr.shape}>".encode())
        h.update(arr.data if arr.dtype != object else repr(arr.tolist()).encode())
    elif isinstance(obj, Mapping):
        h.update(b"<map>")
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            digest(obj[key], h)
    elif isinstance(obj, (tuple, list)):
        h.update(f"<seq {len(obj)}>".encode())
        for item in obj:
            digest(item, h)
    else:
        h.update(f"<{type(obj).__name__} {obj!r}>".encode())


def code_digest() -> str:
    """Hash of ftbc's own source files (a checkpoint of other code is not resumed)."""
    h = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def run_key(run: Any) -> str:
    """What the run computes from: options that change results, the traced ANN, the data and
    calibration images, the code and the numeric libraries."""
    import torch
    h = hashlib.sha256()
    opts = run.options
    digest({f.name: getattr(opts, f.name) for f in fields(opts) if f.name not in NOT_IN_KEY}, h)
    digest(run.ann, h)
    data = run.data
    digest((data.x_train, data.y_train, data.x_test, data.y_test, run.calib), h)
    h.update(f"torch {torch.__version__} numpy {np.__version__}".encode())
    h.update(code_digest().encode())
    return h.hexdigest()


def _refreeze(obj: Any, in_ir: bool = False) -> None:
    """Unpickled arrays are writable; the IR's are read-only (``core.ir.frozen_array``): make
    the arrays inside dataclasses (the graphs) read-only again, leave the others as they were
    made."""
    if isinstance(obj, np.ndarray):
        if in_ir:
            obj.setflags(write=False)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            _refreeze(getattr(obj, f.name), True)
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _refreeze(value, in_ir)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _refreeze(item, in_ir)


def _write(path: Path, payload: Any) -> None:
    from toolchain.report import atomic_write

    def dump(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
    atomic_write(path, dump)


def _read(path: Path, key: str) -> Any | None:
    """The payload of a checkpoint file of this key; None when absent, unreadable or of
    another key."""
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - truncated or foreign: not used, the run starts afresh
        return None
    if not isinstance(saved, dict) or saved.get("key") != key:
        return None
    return saved


@dataclass(eq=False)
class Checkpoints:
    """The checkpoint folder of one run (``key``): read once when the run starts, then
    written after every stage and every finished part."""
    folder: Path
    key: str
    say: Callable[[str], None] = lambda line: None
    resumed_after: str | None = None  # the stage an earlier run had finished
    parts_reused: list[str] = field(default_factory=list)
    credit: float = 0.0  # seconds of reused parts, added to the running stage's time

    def saved_state(self) -> dict | None:
        """The state of an earlier run with this key, or None (with a line saying why an
        existing checkpoint is not used)."""
        path = self.folder / STATE
        saved = _read(path, self.key)
        if saved is None and path.exists():
            self.say(f"resume: the checkpoint in {self.folder} is of another run (options, "
                     "model, data or code differ) or unreadable; starting afresh")
        if saved is None:
            for stale in self.folder.glob("part-*.pkl"):
                if _read(stale, self.key) is None:
                    stale.unlink()
        return saved

    def finished(self, index: int, name: str, run: Any) -> None:
        """Checkpoint ``run`` after stage ``index`` (``name``); its parts are in it now."""
        state = {f.name: getattr(run, f.name) for f in fields(run) if f.name not in REMADE}
        _write(self.folder / STATE, {"key": self.key, "stage": index, "name": name,
                                     "run": state})
        for part in self.folder.glob("part-*.pkl"):
            part.unlink()

    def part(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its result kept by an earlier run of this key."""
        path = self.folder / f"part-{name.replace(':', '-')}.pkl"
        saved = _read(path, self.key)
        if saved is not None:
            _refreeze(saved["value"])
            self.credit += saved["seconds"]
            self.parts_reused.append(name)
            self.say(f"resume: {name} taken from the checkpoint")
            return saved["value"]
        start = time.perf_counter()
        value = compute()
        _write(path, {"key": self.key, "value": value,
                      "seconds": time.perf_counter() - start})
        return value

    def take_credit(self) -> float:
        credit, self.credit = self.credit, 0.0
        return credit

    def record(self) -> dict | None:
        """What this run took from earlier ones (for report.json), None if nothing."""
        if self.resumed_after is None and not self.parts_reused:
            return None
        return {"after_stage": self.resumed_after, "parts": list(self.parts_reused)}


def open_checkpoints(run: Any, folder: Path) -> tuple[Any, int]:
    """Attach the checkpoint folder to ``run`` (once the stages the key needs have run) and
    restore an earlier identical run's state if there is one. Returns (run, index of the
    last stage that earlier run finished, -1 if none)."""
    say = stderr_line if run.options.progress else (lambda line: None)
    folder.mkdir(parents=True, exist_ok=True)
    store = Checkpoints(folder, run_key(run), say)
    saved = store.saved_state()
    if saved is None:
        return replace(run, store=store), -1
    _refreeze(saved["run"])
    store.resumed_after = saved["name"]
    say(f"resume: continuing after stage {saved['stage'] + 1} ({saved['name']}) "
        f"from {folder}")
    return replace(run, store=store, **saved["run"]), saved["stage"]
