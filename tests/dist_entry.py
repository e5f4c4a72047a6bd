"""Entry point for the data-parallel tests: the real CLI (``toolchain.cli.main``) under
torchrun, with two test hooks set through the environment:

* ``FTBC_TEST_DUMP=PATH``: after the ``normalize`` stage, rank 0 saves the float bias
  schedules of every calibration method (``<method>/<layer>``) to PATH (npz).
* ``FTBC_TEST_FAULT=RANK:STAGE:KIND``: rank RANK, on entering STAGE, raises (``raise``),
  kills itself with SIGKILL (``kill``) or stops answering for 10 minutes (``hang``).
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

from core import distributed
from toolchain import cli, pipeline


def _wrap(stage, fault, dump):
    def run(state):
        if fault and fault[1] == stage.__name__ and distributed.rank() == int(fault[0]):
            if fault[2] == "raise":
                raise RuntimeError(f"injected failure in {stage.__name__}")
            if fault[2] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)
        state = stage(state)
        if dump and stage.__name__ == "normalize" and distributed.is_main():
            np.savez(dump, **{f"{method}/{layer.name}": np.asarray(layer.bias_schedule)
                              for method in pipeline.CALIBRATION_METHODS
                              for layer in state.snn[method].layers if not layer.readout})
        return state
    run.__name__ = stage.__name__
    return run


if __name__ == "__main__":
    fault = os.environ.get("FTBC_TEST_FAULT")
    fault = fault.split(":") if fault else None
    dump = os.environ.get("FTBC_TEST_DUMP")
    pipeline.STAGES = tuple(_wrap(s, fault, dump) for s in pipeline.STAGES)
    sys.exit(cli.main())
