"""Fuzz cases shared by ``tests/test_fuzz.py`` (short, hypothesis) and ``bench/fuzz.py`` (long).

Every case is a pure function of ``(category, seed)``: ``run_case(kind, seed, seeds)`` builds
the damaged input with ``random.Random(seed)``, feeds it to the library function a user's file
reaches (``load_model``, ``read_netx``, ``load_data``) or to ``toolchain.cli.main`` in-process,
and returns the outcome: ``"ok"`` or ``"error:<ErrorClass>"`` / ``"exit:<code>"``. Anything
else raises ``Failure``: an exception that is not an ``FtbcError``, a multi-line ``InputError``
message, an exit code outside {0, 2, 3, 4}, a traceback or an internal-error (exit 1) line.

Categories (``KINDS``)
    model   TorchScript (the digits example, a tiny scripted net), state_dict, checkpoint,
            torch.export ``.pt2``, pickled module, ONNX (when the loader has it): truncated,
            bit-flipped, overwritten, byte-inserted; and "rezip": one archive member damaged
            and the archive rebuilt with valid CRCs, so the damage reaches torch's parsers.
    net     ``.net`` files from ``exporters.netx.write_netx``: byte damage, and structural
            damage through h5py (datasets deleted, retyped, reshaped, set to extreme values).
    data    ``npz:`` and ``mnist:`` data: random shapes, dtypes, NaN/Inf, bad labels, missing
            arrays, length mismatches, byte damage; a loaded split is checked against the
            model input shape.
    cli     ``toolchain.cli.main(argv)`` with tiny settings plus a random subset of options
            with random or invalid values (fast-failing ones are most likely), extreme ones
            included (T = 1e15, batch 1e12: refused by the memory estimate).
    signal  a real ``ftbc-export`` process (sometimes verifying in Lava with 1 or 2
            workers) sent SIGINT or SIGTERM, once or twice, to its whole process group
            after a random delay: exit 0 (finished first) or 130/143 with the one-line
            message, no traceback, the previous outputs intact or this run's complete, no
            staging folder and no process of the run left.
"""
from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from core.errors import FtbcError, UnsupportedModelError

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "examples" / "digits_cnn.pt"
ARCH = "tests.models:TinyNet"
ARCH_KWARGS = {"hidden": 5}
KINDS = ("model", "net", "data", "cli", "signal")
TINY = ["--timesteps", "2", "--eval-samples", "20", "--verify-samples", "0",
        "--calib-batches", "1", "--calib-batch-size", "16", "--iterations", "1"]


class Failure(AssertionError):
    """A fuzz case ended in something other than success or a documented one-line error."""


# =========================================================================== outcomes

def outcome(fn: Callable[[], Any]) -> str:
    """Run ``fn``: "ok", or "error:<class>" for a well-formed FtbcError; Failure otherwise."""
    try:
        fn()
    except FtbcError as err:
        text = str(err)
        if not isinstance(err, UnsupportedModelError) and ("\n" in text or not text.strip()):
            raise Failure(f"{type(err).__name__} message is not one line: {text!r}") from err
        return f"error:{type(err).__name__}"
    except Exception as err:  # noqa: BLE001 - exactly what the harness looks for
        raise Failure(f"unhandled {type(err).__name__}: {err}") from err
    return "ok"


def check_cli(code: int, err: str) -> str:
    """Check one in-process CLI run's exit code and stderr; "exit:<code>"."""
    if code not in (0, 2, 3, 4):
        raise Failure(f"exit code {code}; stderr tail: {err[-800:]!r}")
    if "Traceback" in err or "internal error" in err:
        raise Failure(f"traceback or internal error in stderr: {err[-800:]!r}")
    if code:
        lines = err.rstrip("\n").split("\n")
        starts = [i for i, line in enumerate(lines) if line.startswith("ftbc-export: error:")]
        if not starts:
            raise Failure(f"exit {code} without an 'ftbc-export: error:' line: {err[-800:]!r}")
        extra = [line for line in lines[starts[-1] + 1:] if not line.startswith("  - ")]
        if extra:
            raise Failure(f"exit {code}: error message is not one line (+ '  - ' items): "
                          f"{extra[:3]!r}")
    return f"exit:{code}"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``toolchain.cli.main(argv)`` in-process: (exit code, stdout, stderr); argparse's
    SystemExit becomes its code."""
    from toolchain.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return code, out.getvalue(), err.getvalue()


# =========================================================================== seed files

@dataclass
class Seeds:
    """Valid files every mutation starts from (built once per session in ``folder``)."""
    folder: Path
    models: dict[str, Path] = field(default_factory=dict)
    nets: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)
    work: Path | None = None

    def scratch(self, name: str) -> Path:
        return self.work / name


def make_seeds(folder: Path) -> Seeds:
    """Write one valid file per format into ``folder``."""
    import torch
    from tests.lava_builders import conv_net, dense_chain
    from tests.models import TinyNet
    from exporters.netx import write_netx
    folder.mkdir(parents=True, exist_ok=True)
    seeds = Seeds(folder, work=folder / "work")
    seeds.work.mkdir(exist_ok=True)
    torch.manual_seed(0)
    tiny = TinyNet(**ARCH_KWARGS).eval()
    m = seeds.models
    m["digits"] = folder / "digits_cnn.pt"
    shutil.copy(DIGITS_MODEL, m["digits"])
    m["script"] = folder / "tiny_script.pt"
    torch.jit.save(torch.jit.script(tiny), str(m["script"]))
    m["state"] = folder / "tiny_state.pt"
    torch.save(tiny.state_dict(), m["state"])
    m["ckpt"] = folder / "tiny_ckpt.pt"
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, m["ckpt"])
    m["export"] = folder / "tiny.pt2"
    torch.export.save(torch.export.export(tiny, (torch.rand(2, 4),)), str(m["export"]))
    m["pickle"] = folder / "tiny_full.pt"
    torch.save(tiny, m["pickle"])
    if _onnx_supported():
        m["onnx"] = folder / "tiny.onnx"
        torch.onnx.export(tiny, (torch.rand(2, 4),), str(m["onnx"]), dynamo=False)
    seeds.nets["dense"] = folder / "dense.net"
    write_netx(dense_chain(), seeds.nets["dense"])
    seeds.nets["conv"] = folder / "conv.net"
    write_netx(conv_net(), seeds.nets["conv"])
    rng = np.random.default_rng(0)
    for name, n in (("train", 40), ("test", 12)):
        seeds.data[name] = folder / f"{name}.npz"
        np.savez(seeds.data[name], x=rng.random((n, 1, 8, 8), dtype=np.float32),
                 y=rng.integers(0, 10, n))
    return seeds


def _onnx_supported() -> bool:
    try:
        import onnx  # noqa: F401
        from toolchain import load
    except ImportError:
        return False
    return hasattr(load, "load_onnx")


# =========================================================================== byte damage

def damage_bytes(data: bytes, rng: random.Random) -> bytes:
    """One or a few random byte-level damages (truncate, bit flips, overwrite, insert,
    delete, zero the head or tail)."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not buf:
            break
        how, pos = rng.randrange(7), rng.randrange(len(buf))
        if how == 0:
            del buf[rng.randrange(len(buf)):]
        elif how == 1:
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif how == 2:
            n = min(rng.choice((1, 4, 16, 256)), len(buf) - pos)
            buf[pos:pos + n] = bytes(rng.choice((0, 0xFF, rng.randrange(256))) for _ in range(n))
        elif how == 3:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64))))
        elif how == 4:
            del buf[pos:pos + rng.choice((1, 8, 512))]
        elif how == 5:
            buf[:rng.choice((1, 4, 64))] = b"\0" * min(len(buf), 64)
        else:
            del buf[-rng.choice((1, 22, 100)):]
    return bytes(buf)


def rezip(data: bytes, rng: random.Random) -> bytes:
    """Damage one member of a zip archive and rebuild the archive with valid CRCs, so the
    damage gets past the CRC check to the parsers behind it."""
    src = zipfile.ZipFile(io.BytesIO(data))
    infos = src.infolist()
    victim = rng.choice(infos).filename
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in infos:
            body = src.read(info.filename)
            if info.filename == victim:
                if rng.random() < 0.15:
                    continue  # the member is missing
                body = damage_bytes(body, rng)
            dst.writestr(info.filename, body)
    return out.getvalue()


# =========================================================================== the cases

def model_case(seeds: Seeds, rng: random.Random) -> Callable[[], Any]:
    from toolchain.load import load_model
    name = rng.choice(sorted(seeds.models))
    data = seeds.models[name].read_bytes()
    if data[:2] == b"PK" and rng.random() < 0.4:
        data = rezip(data, rng)
    else:
        data = damage_bytes(data, rng)
    path = seeds.scratch(f"model{seeds.models[name].suffix}")
    path.write_bytes(data)
    return lambda: load_model(path, arch=ARCH, arch_kwargs=dict(ARCH_KWARGS))


_EXTREMES = (np.int64(2**62), np.int64(-2**62), np.int64(0), np.int64(-1), np.int64(1 << 23),
             np.float64("nan"), np.float64("inf"), np.float64(-1.5))


def _h5_items(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visit(names.append)
    return names


def damage_h5(path: Path, rng: random.Random) -> None:
    """Structural damage to one object of an HDF5 file, through h5py."""
    with h5py.File(path, "r+") as f:
        names = _h5_items(f)
        name = rng.choice(names)
        obj = f[name]
        how = rng.randrange(6)
        if how == 0 or not isinstance(obj, h5py.Dataset):
            del f[name]
            return
        value = obj[()]
        del f[name]
        if how == 1:      # another dtype
            f[name] = np.asarray(value).astype(rng.choice((np.float32, np.int8, np.uint64,
                                                           "S3", np.bool_)), copy=False) \
                if np.asarray(value).dtype.kind in "iuf" else np.float64(1.0)
        elif how == 2:    # another shape
            arr = np.asarray(value)
            f[name] = rng.choice((arr.reshape(-1)[:max(0, arr.size - 1)], arr.reshape(1, -1),
                                  np.zeros((0,)), np.int64(3), np.stack([arr, arr])))
        elif how == 3:    # extreme values
            arr = np.array(value, copy=True)
            if arr.dtype.kind in "iuf" and arr.size:
                pick = rng.choice(_EXTREMES)
                arr = arr.astype(np.result_type(arr.dtype, pick))
                arr.flat[rng.randrange(arr.size)] = pick
                f[name] = arr
            else:
                f[name] = np.bytes_(rng.choice((b"", b"\xff\xfe", b"{", b"dense", b"[]")))
        elif how == 4:    # a string where a number was, or the reverse
            f[name] = np.bytes_(b"x") if np.asarray(value).dtype.kind != "S" else np.int64(7)
        else:             # a group where a dataset was
            f.create_group(name)


def net_case(seeds: Seeds, rng: random.Random) -> Callable[[], Any]:
    from exporters.netx import read_netx
    src = seeds.nets[rng.choice(sorted(seeds.nets))]
    path = seeds.scratch("net.net")
    if rng.random() < 0.5:
        path.write_bytes(damage_bytes(src.read_bytes(), rng))
    else:
        shutil.copy(src, path)
        for _ in range(rng.choice((1, 1, 2, 3))):
            try:
                damage_h5(path, rng)
            except (KeyError, ValueError, TypeError, OSError):
                break  # the previous damage removed what this one wanted to change
    return lambda: read_netx(path)


_DTYPES = (np.float32, np.float64, np.float16, np.int8, np.uint8, np.int64, np.bool_,
           np.complex64, "U2", "S2", "M8[s]")


def _random_array(rng: random.Random, shape: tuple[int, ...], kind: str) -> np.ndarray:
    gen = np.random.default_rng(rng.randrange(2**32))
    dtype = rng.choice(_DTYPES) if rng.random() < 0.3 else (np.float32 if kind == "x"
                                                             else np.int64)
    if kind == "x":
        arr = gen.random(shape) * rng.choice((1.0, 255.0, 1e30))
    else:
        arr = gen.integers(rng.choice((-3, 0)), rng.choice((1, 10, 2**40)), shape).astype(float)
        if rng.random() < 0.1:
            arr = arr + 0.5
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            arr = arr.astype(dtype)
    except (TypeError, ValueError):
        pass
    if arr.dtype.kind == "f" and arr.size and rng.random() < 0.2:
        arr.flat[rng.randrange(arr.size)] = rng.choice((np.nan, np.inf, -np.inf))
    return arr


def _random_pair(rng: random.Random, mnist: bool) -> dict[str, np.ndarray]:
    n = rng.choice((0, 1, 3, 5))
    sample = (28, 28) if mnist else (1, 8, 8)
    if rng.random() < 0.3:
        sample = tuple(rng.choice((0, 1, 2, 8, 28)) for _ in range(rng.randrange(0, 4)))
    x = _random_array(rng, (n,) + sample, "x")
    if mnist and rng.random() < 0.6 and x.dtype.kind in "fiub":
        x = (np.nan_to_num(x.astype(np.float64)) % 256).astype(np.uint8)
    y_shape = rng.choice(((n,), (n + 1,), (n, 1), (), (max(n - 1, 0),)))
    arrays = {"x": x, "y": _random_array(rng, y_shape, "y")}
    if rng.random() < 0.1:
        del arrays[rng.choice(("x", "y"))]
    if rng.random() < 0.05:
        arrays["extra"] = np.zeros(2)
    return arrays


def data_case(seeds: Seeds, rng: random.Random) -> Callable[[], Any]:
    from toolchain.data import check_input_shape, load_data
    mnist = rng.random() < 0.3
    folder = seeds.scratch("data")
    folder.mkdir(exist_ok=True)
    files = [folder / ("mnist_train.npz" if mnist else "train.npz"),
             folder / ("mnist_test.npz" if mnist else "test.npz")]
    for path, seed_path in zip(files, (seeds.data["train"], seeds.data["test"])):
        if rng.random() < 0.25:
            path.write_bytes(damage_bytes(seed_path.read_bytes(), rng))
        elif rng.random() < 0.15:
            shutil.copy(seed_path, path)
        else:
            np.savez(path, **_random_pair(rng, mnist))
    spec = f"mnist:{folder}" if mnist else f"npz:{files[0]},{files[1]}"
    shape = (1, 28, 28) if mnist else (1, 8, 8)

    def load() -> None:
        split = load_data(spec)
        check_input_shape(split, shape)
    return load


# --------------------------------------------------------------------------- CLI

def _cli_values(seeds: Seeds, rng: random.Random) -> dict[str, Callable[[], list[str]]]:
    """Option -> a generator of its argv tokens (valid values, and invalid ones)."""
    data_dir = seeds.scratch("cli_data")
    pick = rng.choice

    def num(valid: tuple, invalid: tuple) -> Callable[[], list[str]]:
        return lambda: [str(pick(valid if rng.random() < 0.6 else invalid))]

    def data() -> list[str]:
        choice = rng.randrange(6)
        if choice == 0:
            return ["digits"]
        if choice <= 2:   # small but odd valid data through the whole pipeline
            data_dir.mkdir(exist_ok=True)
            gen = np.random.default_rng(rng.randrange(2**32))
            parts = []
            for name in ("tr", "te"):
                n = pick((1, 2, 5, 33))
                x = gen.random((n, 1, 8, 8), dtype=np.float32) * pick((0.0, 1.0, 1e3))
                y = gen.integers(0, pick((1, 10, 1000)), n)
                np.savez(data_dir / f"{name}.npz", x=x, y=y)
                parts.append(str(data_dir / f"{name}.npz"))
            return [f"npz:{','.join(parts)}"]
        return [pick(("digits:3", "npz:", f"npz:{seeds.data['train']}", "mnist:",
                      f"mnist:{seeds.folder}", "imagenet", "", ":", "npz:a,b,c",
                      f"npz:{seeds.data['train']},{seeds.nets['dense']}"))]

    return {
        "--target": lambda: [pick(("loihi2-sim", "loihi2", "float", "float", "tpu", ""))],
        "--data": data,
        "--out": lambda: [pick((str(seeds.scratch("cli_out")),
                                str(seeds.data["train"] / "sub"), str(seeds.data["train"]),
                                "", " ", "/dev/null", "/proc/nope",
                                str(seeds.scratch("cli_out") / ".." / "cli_out2")))],
        "--input-shape": num(("1,8,8",), ("8,8", "0", "a", "1,8,9", "64", "-1,8,8", "")),
        "--arch": num((ARCH,), ("nope", "os:system", "tests.models:build_after_marker",
                                "no.such:Mod", ":")),
        "--arch-kwargs": num(('{"hidden": 5}', "{}"), ("{oops", "[1]", '{"hidden": -1}',
                                                       '{"depth": 2}', "[" * 5000, "null")),
        "--timesteps": num((1, 2, 3), (0, -1, "x", 1.5, "", 10**9, 10**15, "1e3")),
        "--threshold": num(("max", "percentile", "mse"), ("min", "")),
        "--percentile": num((50, 99.9, 100), (0, -5, 101, "nan", "inf", "x")),
        "--threshold-scale": num((0.5, 1, 1.15, 3), (0, -1, "nan", "inf", "x")),
        "--v-init": num((0, 0.25, 0.5, 0.99), (1, -0.1, "nan", "inf")),
        "--alpha": num((0.1, 0.5, 1, 5), (0, -1, "nan", "inf", "1e400")),
        "--calib-batches": num((1, 2), (0, -2, "x")),
        "--calib-batch-size": num((1, 3, 16, 5000), (0, -1, 10**12)),
        "--holdout": num((0, 0.2, 0.5, 0.99), (1, -0.1, "nan", 2)),
        "--eval-samples": num((1, 7, 30, 10**9), (0, -3)),
        "--verify-samples": num((0, 0, 0, 1), (-1, "x")),
        "--seed": num((0, 1, 12345, 2**70), (-1, "x", "1.5")),
        "--verify-workers": num((1, 2, 64), (0, -1, "x", "", "2.5")),
        "--dist-timeout": num((30, 1e6), (0, -1, "nan", "inf", "x")),
        "--iterations": num((1, 2), (0, -1, "x")),
    }


_FLAGS = ("--trust-pickle", "--input-shift", "--no-input-shift", "--no-progress")


def cli_argv(seeds: Seeds, rng: random.Random) -> list[str]:
    """Tiny settings, a model (mostly the digits example) and random options."""
    model = rng.choice((str(seeds.models["digits"]),) * 6 + (
        str(seeds.models["state"]), str(seeds.models["pickle"]), str(seeds.folder),
        str(seeds.scratch("missing.pt")), str(seeds.data["train"]), "-"))
    argv = [model, *TINY, "--out", str(seeds.scratch("cli_out")), "--no-progress"]
    values = _cli_values(seeds, rng)
    for option in rng.sample(sorted(values), rng.randrange(0, 5)):
        argv += [option, *values[option]()]
    argv += rng.sample(_FLAGS, rng.randrange(0, 2))
    if rng.random() < 0.03:
        argv.append(rng.choice(("--list-targets", "--help", "--bogus", "-T")))
    if rng.random() < 0.1 and "--verify-samples" not in argv[-4:]:
        argv += ["--verify-samples", "0"]
    return argv


def cli_case(seeds: Seeds, rng: random.Random) -> Callable[[], Any]:
    argv = cli_argv(seeds, rng)
    if "--target" in argv and "loihi2-sim" in argv or "--target" not in argv:
        # keep Lava runs rare: a verify sample costs seconds
        if rng.random() < 0.8:
            argv += ["--verify-samples", "0"]

    def run() -> str:
        try:
            code, _, err = run_cli(argv)
        except Exception as exc:  # noqa: BLE001 - escaped main(): a harness failure
            raise Failure(f"unhandled {type(exc).__name__} escaped main(): {exc}") from exc
        return check_cli(code, err)
    run.argv = argv  # type: ignore[attr-defined]
    return run


# ------------------------------------------------------------------ signal timing

_PREVIOUS = {"report.json": b'{"previous": true}\n', "notes.txt": b"the user's own file\n"}
_INTERRUPTED = "ftbc-export: interrupted; previous outputs left intact"


def _run_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line holds ``marker`` (the run's unique
    --out: Lava's workers and runtime processes are forks of the CLI, same command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes().decode(errors="replace") and \
                    ") Z " not in (entry / "stat").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def signal_case(seeds: Seeds, rng: random.Random) -> Callable[[], Any]:
    import os
    import signal as sig
    import subprocess
    import sys
    import time
    out = seeds.scratch(f"sig_out_{rng.randrange(1 << 30)}")
    target = rng.choice(("loihi2-sim", "loihi2", "float"))
    verify = rng.choice((0, 0, 3, 6)) if target == "loihi2-sim" else 0  # only there in Lava
    argv = [str(seeds.models["digits"]), "--out", str(out), *TINY, "--no-progress",
            "--target", target,
            "--verify-samples", str(verify), "--verify-workers", str(rng.choice((1, 2)))]
    which = rng.choice((sig.SIGINT, sig.SIGTERM))
    delay, twice = rng.uniform(0.0, 12.0 if verify else 8.0), rng.random() < 0.3

    def run() -> str:
        out.mkdir(parents=True)
        for name, data in _PREVIOUS.items():
            (out / name).write_bytes(data)
        proc = subprocess.Popen([sys.executable, "-m", "toolchain.cli", *argv], cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, which)
                if twice:
                    time.sleep(0.05)
                    os.killpg(proc.pid, which)
        try:
            err = proc.communicate(timeout=120)[1]
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, sig.SIGKILL)
            raise Failure(f"still running 120 s after {which.name}") from None
        try:
            return _check_signal_case(proc.returncode, err, out, which)
        finally:
            time.sleep(0.3)
            left = _run_processes(str(out))
            shutil.rmtree(out, ignore_errors=True)
            if left:
                raise Failure(f"processes of the run left: {left}")
    run.argv = [*argv, f"<{which.name} after {delay:.2f} s{' x2' if twice else ''}>"]
    return run


def _check_signal_case(code: int, err: str, out: Path, which: int) -> str:
    staging = [p.name for p in out.iterdir() if p.name.startswith(".ftbc-staging-")]
    if staging or [p for p in out.iterdir() if p.name.endswith(".tmp")]:
        raise Failure(f"staging or temporary files left: {sorted(os.listdir(out))}")
    if "Traceback" in err:
        raise Failure(f"traceback: {err[-800:]!r}")
    if code == 0:
        if (out / "report.json").read_bytes() == _PREVIOUS["report.json"]:
            raise Failure("exit 0 but report.json is the previous one")
        return "exit:0"
    if code != 128 + which:
        return check_cli(code, err)  # a documented error (e.g. a Lava worker named): exit 6?
    last = err.strip().splitlines()[-1] if err.strip() else ""
    if last != _INTERRUPTED:
        raise Failure(f"exit {code}, last line {last!r}")
    for name, data in _PREVIOUS.items():
        if (out / name).read_bytes() != data:
            raise Failure(f"interrupted run changed the previous {name}")
    extra = set(os.listdir(out)) - set(_PREVIOUS)
    if extra:
        raise Failure(f"interrupted run left new files: {sorted(extra)}")
    return f"exit:{code}"


CASES: dict[str, Callable[[Seeds, random.Random], Callable[[], Any]]] = {
    "model": model_case, "net": net_case, "data": data_case, "cli": cli_case,
    "signal": signal_case}


def run_case(kind: str, seed: int, seeds: Seeds) -> str:
    """Build and run case ``(kind, seed)``; the outcome string, or ``Failure``."""
    case = CASES[kind](seeds, random.Random(f"{kind}:{seed}"))
    if kind in ("cli", "signal"):
        try:
            return case()
        except Failure as exc:
            raise Failure(f"{exc} | argv={case.argv!r}") from exc  # type: ignore[attr-defined]
    return outcome(case)
