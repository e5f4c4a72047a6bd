"""Lava verification in worker processes: parallel, interruptible, never a hang.

``run_lava_pool`` splits the samples into N contiguous shards and forks one worker per
shard; each runs its shard through its own Lava runtime (``sims.lava_runner.run_lava``) and
sends back a ``LavaResult``, which the parent concatenates in sample order, so the
comparison with the emulator is the same as with one runtime. One mechanism covers the
process management:

- Isolation: a worker leads its own process group (Lava forks its runtime processes from
  it, so they join that group) with SIGINT/SIGTERM at their defaults. A Ctrl-C or a SIGTERM
  sent to the CLI's process group therefore reaches the CLI alone, and Lava's processes
  never run the CLI's handlers (which would raise inside Lava's actors and leave them as
  zombies the runtime waits on forever). Every process of a worker's group dies with its
  parent (``PR_SET_PDEATHSIG``), so a SIGKILLed CLI leaves nothing running either.
- Stopping: whatever ends the parent's wait (an interrupt, an error, success) kills each
  worker's whole group with SIGKILL and reaps every process of it (the parent is a child
  subreaper meanwhile, so orphaned Lava processes are reparented to it and reaped here).
- Watchdog, inside a worker: a thread watches the worker's children while Lava runs
  (``waitid(WNOWAIT)``, which sees an exited child without reaping it); a Lava runtime
  process that dies is reported by name and the worker's group is killed at once.
- Watchdog, in the parent: a worker that dies is an error naming it, its samples and how it
  died; a worker that sends no progress for longer than its limit is killed and named. The
  limit is derived from the work: ``WATCHDOG_FACTOR`` x the expected time of the next step
  (building the runtime, or one sample), estimated from the network's size until a sample
  has been measured, then from the slowest sample measured so far.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from pathlib import Path

import numpy as np

from core.errors import InputError, LavaRuntimeError
from core.ir import QuantGraph, SynapseKind
from sims.lava_runner import LavaResult, period_of, run_lava
from sims.progress import progress_bar

# A worker silent for this many times the expected duration of its current step is hung.
WATCHDOG_FACTOR = 20.0
# Conservative costs of Lava's CPU simulation (measured on the digits CNN under load, then
# rounded up): per runtime process and step, per synaptic operation, per process built.
STEP_SECONDS_PER_PROCESS = 2e-3
SECONDS_PER_SYNOP = 2e-8
BUILD_SECONDS_PER_PROCESS = 0.5
MIN_LIMIT_S = 30.0  # no limit below this: a loaded machine stalls a process for seconds

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _prctl(option: int, value: int) -> None:
    """Linux prctl; a no-op where it is unavailable (the watchdogs still work)."""
    with contextlib.suppress(OSError, AttributeError):
        ulong = ctypes.c_ulong
        ctypes.CDLL(None, use_errno=True).prctl(ctypes.c_int(option), ulong(value), ulong(0),
                                                ulong(0), ulong(0))


# --------------------------------------------------------------------------- estimates

def _processes_and_synops(q: QuantGraph) -> tuple[int, int]:
    """Lava processes (input, one per synapse and per layer) and synaptic operations per
    step (every weight applied once: dense in x out, conv out x in/groups x kernel)."""
    procs, synops = 1, 0
    for layer in q.layers:
        procs += 1 + len(layer.synapses)
        for syn in layer.synapses:
            w = np.asarray(syn.weight)
            if syn.kind is SynapseKind.DENSE:
                synops += int(w.size)
            else:
                synops += int(np.prod(layer.shape)) * int(np.prod(w.shape[1:]))
    return procs, synops


def expected_seconds(q: QuantGraph) -> tuple[float, float]:
    """(building one runtime, running one sample), a priori, from the network's size."""
    procs, synops = _processes_and_synops(q)
    per_step = procs * STEP_SECONDS_PER_PROCESS + synops * SECONDS_PER_SYNOP
    return procs * BUILD_SECONDS_PER_PROCESS, period_of(q) * per_step


# --------------------------------------------------------------------------- worker side

class _Sender:
    """Messages to the parent from two threads (the run and the watchdog), one at a time."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()

    def __call__(self, *message) -> None:
        with self.lock:
            self.conn.send(message)


def _lava_child_name(pid: int) -> str:
    """The child ``pid`` by its multiprocessing name (Lava starts one ``SystemProcess-N``
    per process model and one for the runtime service), read from multiprocessing's
    registry of children, which, unlike ``active_children()``, does not reap it."""
    import multiprocessing.process
    for child in list(getattr(multiprocessing.process, "_children", ())):
        if child.pid == pid:
            return f"Lava runtime process {child.name} (pid {pid})"
    return f"process {pid} (a child of Lava's runtime)"


@contextlib.contextmanager
def _watch_children(send: _Sender, index: int):
    """While the body runs, a child that exits is a dead Lava runtime process: report it
    and kill this worker's group (Lava would wait for it forever)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is None or stop.is_set():
                continue
            how = (f"was killed by {signal.Signals(info.si_status).name}"
                   if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED)
                   else f"exited with code {info.si_status}")
            send("failed", f"{_lava_child_name(info.si_pid)} of verification worker "
                           f"{index} {how}")
            os.killpg(0, signal.SIGKILL)

    thread = threading.Thread(target=watch, name="lava-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _worker(index: int, net_path: str, x_int: np.ndarray, conn: Connection) -> None:
    """The body of a forked worker; never returns (``os._exit``)."""
    code, send = 1, _Sender(conn)
    try:
        os.setpgid(0, 0)
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        os.register_at_fork(after_in_child=lambda: _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        result = run_lava(net_path, x_int, on_sample=lambda k: send("sample", k),
                          guard=lambda: _watch_children(send, index))
        send("done", result)
        code = 0
    except InputError as exc:
        send("input", str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        with contextlib.suppress(BaseException):
            last = traceback.extract_tb(exc.__traceback__)[-1:]
            where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
            send("failed", f"verification worker {index} failed: {type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                           f"{where}")
    finally:
        if code != 0:
            with contextlib.suppress(BaseException):
                os.killpg(0, signal.SIGKILL)  # Lava's processes with it, no clean stop
        os._exit(code)


# --------------------------------------------------------------------------- parent side

@dataclass
class _Worker:
    index: int
    pid: int
    conn: Connection
    samples: range
    built_limit: float
    sample_limit: float
    started: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    done: int = 0
    result: LavaResult | None = None
    reaped: bool = False

    def label(self) -> str:
        first, last = self.samples.start, self.samples.stop - 1
        return f"verification worker {self.index} (pid {self.pid}, samples {first}-{last})"


def _spawn(pool: list[_Worker], index: int, net_path: str, x_int: np.ndarray,
           samples: range, limits: tuple[float, float]) -> None:
    """Fork a worker and add it to ``pool``. SIGINT/SIGTERM are blocked in this thread and
    their Python handlers deferred across the fork: the child never runs the parent's
    handlers, and a handler that raises cannot fire inside ``os.fork``'s at-fork hooks
    (Python would report and drop the exception there: a swallowed Ctrl-C). A deferred
    signal is handled once the worker is in ``pool``, so the clean-up finds it."""
    receive, send = Pipe(duplex=False)
    deferred: list[int] = []
    handlers = {sig: signal.signal(sig, lambda signum, _: deferred.append(signum))
                for sig in _STOP_SIGNALS}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        pid = os.fork()
        if pid == 0:
            receive.close()
            _worker(index, net_path, x_int[samples.start:samples.stop], send)
        with contextlib.suppress(OSError):  # the child does it too; whoever is first
            os.setpgid(pid, pid)
        send.close()
        pool.append(_Worker(index, pid, receive, samples, *limits))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if deferred:  # delivered again, now to the restored handler (or default action)
            signal.raise_signal(deferred[0])


def _exit_status(worker: _Worker) -> str:
    """How a worker that closed its pipe ended (reaping it)."""
    _, status = os.waitpid(worker.pid, 0)
    worker.reaped = True
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


def _receive(worker: _Worker, bar) -> None:
    """One message from ``worker``; errors raise (naming it)."""
    try:
        kind, *body = worker.conn.recv()
    except (EOFError, OSError):
        raise LavaRuntimeError(f"{worker.label()} {_exit_status(worker)} before it "
                               f"finished") from None
    worker.last = time.monotonic()
    if kind == "sample":
        worker.done += 1
        bar.update(1)
    elif kind == "done":
        worker.result = body[0]
    elif kind == "input":
        raise InputError(body[0])
    else:
        raise LavaRuntimeError(body[0])


def _check_progress(pool: list[_Worker], measured: list[float]) -> None:
    """A worker silent for longer than its limit is hung: name it."""
    now = time.monotonic()
    for w in pool:
        if w.result is not None:
            continue
        expected = max(measured) if measured else w.sample_limit
        limit = max(MIN_LIMIT_S, WATCHDOG_FACTOR * (
            expected + (w.built_limit if w.done == 0 else 0.0)))
        if now - w.last > limit:
            raise LavaRuntimeError(
                f"{w.label()} made no progress for {now - w.last:.0f} s (limit {limit:.0f} s"
                f" = {WATCHDOG_FACTOR:g} x the expected time of its next step); it was "
                f"stopped")


def _gather(pool: list[_Worker], progress: bool) -> None:
    measured: list[float] = []
    with progress_bar(sum(len(w.samples) for w in pool), "lava", progress, leave=True) as bar:
        while any(w.result is None for w in pool):
            busy = {w.conn: w for w in pool if w.result is None}
            for conn in wait(list(busy), timeout=0.5):
                w = busy[conn]
                before, done = w.last, w.done
                _receive(w, bar)
                if w.done > max(done, 1):  # a sample after the first (which also built)
                    measured.append(w.last - before)
            _check_progress(pool, measured)


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            kids = {int(k) for k in
                    Path(f"/proc/{parent}/task/{parent}/children").read_text().split()}
        except (OSError, ValueError):
            continue
        found |= kids
        todo += kids
    return found


def _stop(pool: list[_Worker]) -> None:
    """Kill every worker's group (and every descendant, should one have left the group)
    and reap them all: the workers, then Lava's processes, reparented to us (the child
    subreaper) as their parents die."""
    doomed = set()
    for w in pool:
        doomed |= descendants(w.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.pid, signal.SIGKILL)
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    for w in pool:
        w.conn.close()
        if not w.reaped:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(w.pid, 0)
        while True:  # the group's processes already reparented to us (a worker that died)
            try:
                os.waitpid(-w.pid, 0)
            except ChildProcessError:
                break
    deadline = time.monotonic() + 10.0
    while doomed and time.monotonic() < deadline:
        for pid in list(doomed):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    doomed.discard(pid)
            except ChildProcessError:  # reaped already, or not (yet) reparented to us
                if not Path(f"/proc/{pid}").exists():
                    doomed.discard(pid)
        time.sleep(0.01)


def shards(num: int, workers: int) -> list[range]:
    """Contiguous, near-equal, non-empty sample ranges (at most ``num`` of them)."""
    bounds = np.linspace(0, num, min(workers, num) + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def run_lava_pool(q: QuantGraph, net_path: str, x_int: np.ndarray, *, workers: int,
                  progress: bool = False) -> LavaResult:
    """``run_lava`` over ``workers`` worker processes (see the module doc): the same
    result, samples in order. Raises ``LavaRuntimeError`` naming a worker that died,
    failed or hung, ``InputError`` for a network Lava cannot run; interrupts (any
    exception) stop and reap every worker first."""
    start = time.perf_counter()
    limits = expected_seconds(q)
    pool: list[_Worker] = []
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    try:
        for index, samples in enumerate(shards(x_int.shape[0], workers)):
            _spawn(pool, index, net_path, x_int, samples, limits)
        _gather(pool, progress)
    finally:
        _stop(pool)
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
    results = [w.result for w in pool]
    return LavaResult(
        spikes={name: np.concatenate([r.spikes[name] for r in results], axis=1)
                for name in results[0].spikes},
        readout=np.concatenate([r.readout for r in results], axis=1),
        seconds=time.perf_counter() - start)
