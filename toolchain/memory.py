"""Memory estimate before the expensive stages: refuse a run that cannot fit, with the
figure and the option to lower, instead of growing until the kernel kills it (exit 137, no
message) or torch's allocator fails half-way.

Memory is bounded by the batch, not by the evaluation set or T (``docs/architecture.md``,
"Memory"): the simulations stream a batch through the layers in time chunks and the
calibration keeps its cached spike trains on disk. What remains above the process's own
size (interpreter, torch, the data set as loaded, the model) is estimated as the sum of:

* ``FIXED_BYTES`` (kernels' workspaces, thread pools, modules the stages import);
* per batch: ``BYTES_PER_NEURON`` per (sample, neuron) for the samples processed at once
  (the largest of the evaluation batch, a calibration batch and the held-out part):
  membranes, input currents, the time chunks of spikes in flight;
* the calibration's current cache: one layer's input currents over T for every calibration
  sample (4 bytes each), kept only up to ``CURRENT_CACHE_BYTES``;
* the MSE threshold search, which needs every value of a channel: the calibration set's
  activations (4 bytes per sample and neuron), the widest layer's values regrouped by
  channel (``REGROUP_BYTES`` per sample and neuron: the copy and a concatenation in
  flight), and one block of channels sorted in float64 with two prefix sums
  (``SEARCH_BYTES`` per value, at most ``convert.SEARCH_BLOCK_VALUES`` values);
* the readouts of the whole evaluation set: 8 bytes per (sample, step, class), a few times.

The constants are measured from each stage's peak RSS (``peak_rss_mib`` in report.json,
minus the ``load`` stage's): the digits CNN at T = 32 and 128 (calibrate peaks 200 and 124
MB above the cache and readout terms with 256 x 3,658 neurons at once: the fixed part) and
VGG-16 at T = 64 (about 0.7 GB above the loaded process while calibrating its widest layers
with 128 x 277,002 neurons at once: about 12 bytes per (sample, neuron) beyond the fixed part),
rounded up, and the trained VGG-16's convert stage (1.63 GiB above trace with 800 threshold
samples: 0.83 activations, 0.33 the search block, the rest the widest layer regrouped)
(bench/README.md, "Scale"). The estimate is meant to be on the safe side. Before
streaming it was 6 bytes per (sample, step, neuron): it grew with T, and so did the memory.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.ir import AnnGraph
from toolchain.ann import ann_forward
from toolchain.convert import ACTIVATIONS, SEARCH_BLOCK_VALUES

FIXED_BYTES = 256e6
BYTES_PER_NEURON = 16.0
SEARCH_BYTES = 40.0  # float64 values, their sorted copy, two float64 prefix sums
REGROUP_BYTES = 12.0
CURRENT_CACHE_BYTES = 1 << 29  # toolchain.calibrate's (the integer calibration's is half)
READOUT_COPIES = 3  # the emulator's int64 readout, its argmax, the gathered predictions
EVAL_BATCH = 256  # samples per batch of the float simulation (sims.torch_snn.simulate)


def neuron_count(ann: AnnGraph, example: np.ndarray) -> tuple[int, int, int]:
    """(spiking neurons plus the readout, the widest spiking layer, classes) from one
    sample's forward pass: every activation that ``convert`` makes a neuron layer of (ReLU
    and QCFS alike)."""
    logits, values = ann_forward(ann, example[:1], record=True)
    spiking = {node.name for node in ann.nodes if isinstance(node, ACTIVATIONS)}
    sizes = [int(v[0].numel()) for name, v in values.items() if name in spiking]
    classes = int(logits[0].numel())
    return sum(sizes) + classes, max(sizes, default=classes), classes


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


def estimate_bytes(ann: AnnGraph, example: np.ndarray, *, timesteps: int, at_once: int,
                   calib_samples: int, eval_samples: int) -> tuple[float, dict[str, float]]:
    """The estimate (module docstring) and its parts."""
    neurons, widest, classes = neuron_count(ann, example)
    parts = {
        "fixed": FIXED_BYTES,
        "batch": BYTES_PER_NEURON * at_once * neurons,
        "current_cache": float(min(4 * timesteps * calib_samples * widest,
                                   CURRENT_CACHE_BYTES)),
        "threshold_search": float(calib_samples * (4 * neurons + REGROUP_BYTES * widest)
                                  + SEARCH_BYTES * min(calib_samples * widest,
                                                       SEARCH_BLOCK_VALUES)),
        "readouts": float(8 * READOUT_COPIES * timesteps * eval_samples * classes),
    }
    return sum(parts.values()), parts


def check_memory(ann: AnnGraph, example: np.ndarray, *, timesteps: int, calib_batch: int,
                 eval_samples: int, calib_samples: int | None = None,
                 holdout_samples: int = 0) -> float:
    """The estimate in bytes; ``InputError`` naming it and what to lower when it exceeds
    the available memory. ``calib_samples`` defaults to ``len(example)``."""
    calib_samples = len(example) if calib_samples is None else calib_samples
    eval_batch = min(eval_samples, EVAL_BATCH)
    at_once = max(calib_batch, eval_batch, holdout_samples)
    need, parts = estimate_bytes(ann, example, timesteps=timesteps, at_once=at_once,
                                 calib_samples=calib_samples, eval_samples=eval_samples)
    free = available_bytes()
    if free is not None and need > free:
        biggest = max(parts, key=parts.get)
        lower = {"fixed": "nothing: free memory",
                 "batch": "--calib-batch-size" if calib_batch >= eval_batch
                 else "--eval-samples",
                 "threshold_search": "--calib-batches or --calib-batch-size",
                 "current_cache": "--calib-batch-size", "readouts": "--eval-samples or "
                 "--timesteps"}[biggest]
        raise InputError(
            f"this run needs about {need / 1e9:.1f} GB ({at_once} samples at once x "
            f"{neuron_count(ann, example)[0]} neurons, {timesteps} steps), "
            f"{free / 1e9:.1f} GB are available; lower {lower}")
    return need


# --------------------------------------------------------------------------- measured peak

def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``5 > /proc/self/clear_refs`` resets VmHWM to
    the current RSS). False where the kernel does not allow it: the peak then stays the
    process's peak since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The resident-set peak since the last ``reset_peak_rss`` (VmHWM), or since the process
    started (``ru_maxrss``) where /proc is not readable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
