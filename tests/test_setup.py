"""The environment the Makefile builds: Lava imports and the idempotent Lava patch."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lava_imports() -> None:
    from lava.magma.core import run_configs
    from lava.proc.lif import process
    from lava.lib.dl import netx
    assert hasattr(run_configs, "Loihi2SimCfg")
    assert hasattr(process, "LIF")
    assert hasattr(netx, "hdf5")


def test_patch_lava_is_idempotent() -> None:
    for _ in range(2):
        run = subprocess.run([sys.executable, str(ROOT / "scripts" / "patch_lava.py")],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.strip().splitlines()
        assert len(lines) == 3 and all("already patched" in line for line in lines), run.stdout
