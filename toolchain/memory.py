"""Memory estimate before the expensive stages: refuse a run that cannot fit, with the
figure and the option to lower, instead of growing until the kernel kills it (exit 137, no
message) or torch's allocator fails half-way.

The simulations, calibration and emulation hold per-step state for the samples they
process at once: about ``BYTES_PER_NEURON_STEP`` bytes per (sample, step, neuron), for
``max(--calib-batch-size, the evaluation batch)`` samples at once. The constant is
measured: the digits CNN (3,658 neurons, all 360 test samples, calibration batch 32) peaks
at 621 MB at T = 32 and 1,084 MB at T = 128, i.e. 5.1 bytes per (sample, step, neuron)
over the evaluation batch of 256; rounded up to 6.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import InputError
from core.ir import AnnGraph, ReluNode
from toolchain.ann import ann_forward

BYTES_PER_NEURON_STEP = 6.0
EVAL_BATCH = 256  # samples per batch of the float simulation (sims.torch_snn.simulate)


def neuron_count(ann: AnnGraph, example: np.ndarray) -> int:
    """Spiking neurons (ReLU outputs) plus the readout, from one sample's forward pass."""
    logits, values = ann_forward(ann, example[:1], record=True)
    relus = {node.name for node in ann.nodes if isinstance(node, ReluNode)}
    return int(sum(v[0].numel() for name, v in values.items() if name in relus)
               + logits[0].numel())


def available_bytes() -> int | None:
    """Memory this process may still take: the smaller of the system's MemAvailable and
    what its cgroup (v2 or v1) limit leaves; None where neither is readable."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:
                candidates.append(int(cap) - int(Path(usage).read_text()))
        except (OSError, ValueError):
            continue
    return min(candidates) if candidates else None


def check_memory(ann: AnnGraph, example: np.ndarray, *, timesteps: int, calib_batch: int,
                 eval_samples: int) -> float:
    """The estimate in bytes; ``InputError`` naming it and what to lower when it exceeds
    the available memory."""
    neurons = neuron_count(ann, example)
    eval_batch = min(eval_samples, EVAL_BATCH)
    at_once = max(calib_batch, eval_batch)
    need = BYTES_PER_NEURON_STEP * timesteps * at_once * neurons
    free = available_bytes()
    if free is not None and need > free:
        lower = "--calib-batch-size" if calib_batch >= eval_batch else "--eval-samples"
        fits = int(np.floor(free / (BYTES_PER_NEURON_STEP * at_once * neurons)))
        raise InputError(
            f"this run needs about {need / 1e9:.1f} GB ({timesteps} steps x {at_once} samples "
            f"at once x {neurons} neurons), {free / 1e9:.1f} GB are available; lower "
            f"--timesteps (at most about {max(fits, 1)} fit) or {lower}")
    return need
