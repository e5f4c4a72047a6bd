"""Apply the two source patches lava-nc 0.10.0 / lava-dl 0.6.0 need on Python 3.11.

Idempotent: a patch already applied is recognised and left alone. Fails loudly (exit 1) when
neither the original nor the patched text is found, i.e. when the installed Lava is not the
version these patches were written for.

1. lava/magma/compiler/var_model.py: Python 3.11 rejects mutable dataclass defaults such as
   ``x: ByteEncoder = ByteEncoder()``; use ``field(default_factory=ByteEncoder)``.
2. lava/lib/dl/slayer/__init__.py imports ``object_detection`` (needs cv2 and torchvision,
   which we do not install); make that import optional.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"patch_lava: package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _patch(path: Path, old: str | re.Pattern, new: str, done_marker: str) -> None:
    text = path.read_text()
    if done_marker in text:
        print(f"patch_lava: {path} already patched")
        return
    patched, count = (old.subn(new, text) if isinstance(old, re.Pattern)
                      else (text.replace(old, new), text.count(old)))
    if count == 0:
        sys.exit(f"patch_lava: expected text not found in {path}; is this lava 0.10.0 / lava-dl 0.6.0?")
    path.write_text(patched)
    print(f"patch_lava: patched {path} ({count} place(s))")


def main() -> None:
    lava = _package_dir("lava")
    var_model = lava / "magma" / "compiler" / "var_model.py"
    _patch(var_model, re.compile(r"^(\s+\w+): ByteEncoder = ByteEncoder\(\)$", re.M),
           r"\1: ByteEncoder = field(default_factory=ByteEncoder)",
           "field(default_factory=ByteEncoder)")
    _patch(var_model, "from dataclasses import dataclass, InitVar\n",
           "from dataclasses import dataclass, InitVar, field\n",
           "from dataclasses import dataclass, InitVar, field\n")
    slayer = lava / "lib" / "dl" / "slayer" / "__init__.py"
    _patch(slayer, "from . import object_detection as obd\n",
           "try:  # needs cv2 and torchvision; optional (patched by ftbc)\n"
           "    from . import object_detection as obd\n"
           "except ImportError:\n"
           "    obd = None\n",
           "optional (patched by ftbc)")


if __name__ == "__main__":
    main()
