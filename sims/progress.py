"""Progress bars on stderr: one helper for every long loop (simulation, emulation, Lava,
calibration).

A bar built while a signal is being delivered (Ctrl-C, SIGTERM) may be left half-constructed;
tqdm's own ``__del__`` then fails on the missing attributes and prints "Exception ignored"
noise after our one-line "interrupted" message. ``_Bar`` closes only what was built, and
clears the line of a bar whose constructor was interrupted after its first print.
"""
from __future__ import annotations

import sys

from tqdm import tqdm


def _closable(bar: tqdm) -> bool:
    """Whether tqdm's ``close`` can run on ``bar``, however far its constructor got before a
    signal stopped it; a bar stopped right after its first print is made to clear its line."""
    if not (hasattr(bar, "pos") and hasattr(bar, "disable")):
        return False  # stopped before tqdm placed it: nothing printed, tqdm's close would fail
    if getattr(bar, "sp", None) is not None and not hasattr(bar, "start_t"):
        # Stopped between the constructor's first print (``refresh``) and its last line:
        # tqdm's close would take the bar for never displayed and leave its partial line in
        # front of the "interrupted" message. Mark it as displayed.
        bar.last_print_t = bar.start_t = bar._time()
    return True


class _Bar(tqdm):
    def close(self):  # also what tqdm's ``__del__`` calls
        if _closable(self):
            super().close()


def stderr_line(text: str) -> None:
    """``text`` and its newline on stderr in one write: ``print`` writes the two apart, and an
    interrupt landing between them left the "interrupted" message glued to the line
    ('[4/14] calibrateftbc-export: interrupted'; found by CI)."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "sample",
                 leave: bool = False) -> tqdm:
    """A tqdm bar on stderr (disabled bars print nothing and cost nothing)."""
    return _Bar(total=total, desc=desc, disable=not enabled, file=sys.stderr, unit=unit,
                leave=leave)


def close_all_bars() -> None:
    """Close every live bar (a bar held by an unwound frame may still be open): after an
    interrupt the one-line message must start on a line of its own, never after a bar's
    partial line; half-built bars are closed as far as they were built."""
    for bar in list(getattr(tqdm, "_instances", ())):
        if _closable(bar):
            bar.close()
