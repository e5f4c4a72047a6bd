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


class _Bar(tqdm):
    def close(self):
        if getattr(self, "sp", None) is not None and not hasattr(self, "start_t"):
            # The signal landed between the constructor's first print (``refresh``) and its
            # last line: tqdm's close would take the bar for never displayed and leave its
            # partial line in front of the "interrupted" message. Mark it as displayed.
            self.last_print_t = self.start_t = self._time()
        super().close()

    def __del__(self):
        if hasattr(self, "pos") and hasattr(self, "disable"):
            super().__del__()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "sample",
                 leave: bool = False) -> tqdm:
    """A tqdm bar on stderr (disabled bars print nothing and cost nothing)."""
    return _Bar(total=total, desc=desc, disable=not enabled, file=sys.stderr, unit=unit,
                leave=leave)


def close_all_bars() -> None:
    """Close every live bar (a bar held by an unwound frame may still be open): after an
    interrupt the one-line message must start on a line of its own, never after a bar's
    partial line. Half-built bars are skipped (see ``_Bar``)."""
    for bar in list(getattr(tqdm, "_instances", ())):
        if hasattr(bar, "pos") and hasattr(bar, "disable"):
            bar.close()
