"""Interrupts and dead processes around Lava (``sims.lava_pool``, ``toolchain.cli``).

Signals go to the whole process group of a real ``ftbc-export`` run (as Ctrl-C in a
terminal, or a batch scheduler's SIGTERM, deliver them), during verification, calibration
and emulation: the run must stop within seconds with exit 130/143 and one line, leave the
previous outputs byte-identical, no staging folder and no process behind. A Lava runtime
process that dies, or one that hangs, must be a named error, never a hang.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sims.lava_pool as lava_pool
from core.errors import LavaRuntimeError
from exporters.netx import write_netx
from sims.lava_pool import descendants, run_lava_pool, shards
from sims.reference import encode_input
from tests.lava_builders import conv_net, random_inputs
from tests.test_faults import DIGITS_MODEL, ROOT, assert_intact, good_run  # noqa: F401
from tests.test_lava import _assert_equal_to_reference

# Stops "within seconds": generous for a loaded 2-core machine, far below the run's length.
STOP_WITHIN_S = 20.0
SETTINGS = ["--timesteps", "3", "--calib-batches", "1", "--calib-batch-size", "16",
            "--iterations", "1", "--eval-samples", "20", "--verify-workers", "2"]


def _children(pid: int) -> set[int]:
    try:
        return {int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except OSError:
        return set()


class Run:
    """A real ``ftbc-export`` in its own session (its own process group), stderr read by a
    thread so the test can wait for a stage or for Lava's progress."""

    def __init__(self, out: Path, *extra: str):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "toolchain.cli", str(DIGITS_MODEL), "--out", str(out),
             *SETTINGS, *extra], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.err: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read(1), ""):
            self.err.append(chunk)

    def text(self) -> str:
        return "".join(self.err)

    def wait_for(self, needle: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"{needle!r} never appeared: {self.text()[-2000:]}")
            time.sleep(0.05)

    def finish(self) -> tuple[int, float]:
        """(exit code, seconds it took to exit from now)."""
        start = time.monotonic()
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"the run did not stop: {self.text()[-2000:]}")
        self.reader.join(10)
        return code, time.monotonic() - start


def _assert_stopped_cleanly(run: Run, code: int, seconds: float, sig: int, out: Path,
                            before: dict, processes: set[int]) -> None:
    text = run.text()
    assert code == 128 + sig, text[-2000:]
    assert seconds < STOP_WITHIN_S, f"took {seconds:.1f} s to stop"
    assert text.strip().splitlines()[-1] == \
        "ftbc-export: interrupted; previous outputs left intact"
    assert "Traceback" not in text and "Error" not in text, text[-3000:]
    assert_intact(out, before)
    time.sleep(0.2)
    assert not [p for p in processes if Path(f"/proc/{p}").exists()], "processes left"


@pytest.mark.lava
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_group_signal_during_lava_verification(good_run, sig):
    out, before = good_run
    run = Run(out, "--verify-samples", "300")
    run.wait_for("] verify")
    run.wait_for("lava:   0%|          | 1/300")  # Lava's runtimes are up and running
    processes = descendants(run.proc.pid)
    assert len(processes) > 4  # 2 workers and their Lava runtime processes
    os.killpg(run.proc.pid, sig)
    code, seconds = run.finish()
    _assert_stopped_cleanly(run, code, seconds, sig, out, before, processes)


@pytest.mark.parametrize("sig, stage, twice", [(signal.SIGINT, "calibrate", True),
                                               (signal.SIGTERM, "emulate", False)])
def test_group_signal_during_calibration_and_emulation(good_run, sig, stage, twice):
    """``twice``: a second Ctrl-C 50 ms later lands in the clean-up of the first: ignored,
    not a traceback from the unwinding (reproducer 7)."""
    out, before = good_run
    run = Run(out, "--verify-samples", "5")
    run.wait_for(f"] {stage}")
    os.killpg(run.proc.pid, sig)
    if twice:
        time.sleep(0.05)
        os.killpg(run.proc.pid, sig)
    code, seconds = run.finish()
    if code == 0:
        pytest.skip(f"the run finished before {signal.Signals(sig).name} arrived")
    _assert_stopped_cleanly(run, code, seconds, sig, out, before, set())


@pytest.mark.lava
def test_a_dead_lava_process_is_a_named_error(good_run):
    out, before = good_run
    run = Run(out, "--verify-samples", "300")
    run.wait_for("lava:   0%|          | 1/300")
    worker = min(_children(run.proc.pid))
    victim = max(descendants(worker))  # one of worker's Lava runtime processes
    processes = descendants(run.proc.pid)
    os.kill(victim, signal.SIGKILL)
    code, seconds = run.finish()
    last = run.text().strip().splitlines()[-1]
    assert code == LavaRuntimeError.exit_code, run.text()[-2000:]
    # the message says which watchdog stopped the run (a death or a hang), should this fail
    assert seconds < STOP_WITHIN_S, (seconds, victim, processes, run.text()[-2000:])
    assert last.startswith("ftbc-export: error: ") and f"pid {victim}" in last, last
    assert "killed by SIGKILL" in last and "verification worker 0" in last, last
    assert_intact(out, before)
    time.sleep(0.2)
    assert not [p for p in processes if Path(f"/proc/{p}").exists()], "processes left"


# --------------------------------------------------------------------------- the pool itself

@pytest.mark.lava
def test_pool_equals_the_reference_across_uneven_shards(tmp_path):
    """5 samples over 2 workers (3 + 2): concatenated in sample order, spike for spike."""
    q = conv_net()
    path = tmp_path / "net.net"
    write_netx(q, path)
    x_int = encode_input(q.input, random_inputs(q, 5))
    result = run_lava_pool(q, str(path), x_int, workers=2)
    _assert_equal_to_reference(q, result, x_int)
    assert [len(r) for r in shards(5, 2)] == [2, 3] or [len(r) for r in shards(5, 2)] == [3, 2]
    assert shards(1, 4) == [range(0, 1)]


@pytest.mark.lava
def test_a_hung_lava_process_is_stopped_and_named(tmp_path, monkeypatch):
    """A Lava runtime process that stops (SIGSTOP) without dying: the parent's watchdog
    names the silent worker once its limit passes, and reaps every process."""
    monkeypatch.setattr(lava_pool, "MIN_LIMIT_S", 3.0)
    monkeypatch.setattr(lava_pool, "WATCHDOG_FACTOR", 2.0)
    q = conv_net()
    path = tmp_path / "net.net"
    write_netx(q, path)
    x_int = encode_input(q.input, random_inputs(q, 400))
    me, stopped = os.getpid(), []

    def stop_one() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stopped:
            lava = [p for w in _children(me) for p in descendants(w)]
            if len(lava) > 3:
                time.sleep(1.0)
                os.kill(max(lava), signal.SIGSTOP)
                stopped.append(max(lava))
            time.sleep(0.1)

    before = _children(me)  # (other tests' processes, if any)
    thread = threading.Thread(target=stop_one, daemon=True)
    thread.start()
    start = time.monotonic()
    with pytest.raises(LavaRuntimeError, match=r"verification worker 0 .* made no progress"):
        run_lava_pool(q, str(path), x_int, workers=1)
    assert stopped, "the watchdog fired before anything was stopped"
    thread.join()
    assert stopped and time.monotonic() - start < 120
    assert _children(me) <= before and not Path(f"/proc/{stopped[0]}").exists()


# --------------------------------------------------------------------------- the CLI's pieces

def test_an_interrupt_inside_a_destructor_is_not_reported_as_ignored(monkeypatch):
    """Python reports an exception raised in a destructor or weakref callback ("Exception
    ignored ... Traceback"); for the remembered stop signal that is noise (seen when a
    SIGTERM landed in a WeakValueDictionary callback), for anything else it stays."""
    import toolchain.cli as cli

    class Noisy:
        def __init__(self, exc: BaseException) -> None:
            self.exc = exc

        def __del__(self):
            raise self.exc

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))
    with cli._stop_handlers():
        cli._stopped.append(signal.SIGTERM)
        Noisy(cli.Terminated())
        Noisy(ValueError("a real bug"))
        Noisy(KeyboardInterrupt())
    assert [type(e) for e in reported] == [ValueError]
    cli._stopped.clear()  # no stop signal: an interrupt in a destructor is reported again
    with cli._stop_handlers():
        Noisy(KeyboardInterrupt())
    assert [type(e) for e in reported] == [ValueError, KeyboardInterrupt]


def test_open_bars_are_closed_before_the_interrupted_line(capsys):
    from sims.progress import close_all_bars, progress_bar
    bar = progress_bar(10, "emulate", enabled=True)
    bar.update(1)
    close_all_bars()
    assert bar.disable  # closed
    assert capsys.readouterr().err.endswith("\r")  # the bar's line was cleared


def test_bar_interrupted_after_its_first_print_is_cleared(monkeypatch, capsys):
    """A SIGTERM landing in tqdm's constructor after it printed the bar's first line (found by
    CI: 'emulate:   0%|...ftbc-export: interrupted' on one line): the clean-up clears it."""
    import gc
    from tqdm import tqdm
    from sims.progress import close_all_bars, progress_bar
    refresh = tqdm.refresh

    def refresh_then_signal(self, *args, **kwargs):
        refresh(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm, "refresh", refresh_then_signal)
    with pytest.raises(KeyboardInterrupt):
        progress_bar(20, "emulate", enabled=True)
    gc.collect()
    close_all_bars()
    err = capsys.readouterr().err
    assert "emulate:   0%" in err
    assert err.endswith("\r")  # the partial line was cleared: the message starts afresh


def test_stage_line_is_one_write_with_its_newline(monkeypatch):
    """An interrupt between a stage line's text and its newline (Python runs signal handlers
    between two writes) left 'ftbc-export: interrupted' on the stage's line (CI, 6f5cd69):
    progress lines (the CLI's stages, --resume's messages) reach stderr in a single write."""
    from sims.progress import stderr_line
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Recorder())
    stderr_line("[4/14] calibrate")
    assert writes == ["[4/14] calibrate\n"]
