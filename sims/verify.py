"""Spike-for-spike comparison of Lava's simulation with the bit-exact emulator.

``verify`` runs the exported file in Lava (``sims.lava_runner``) and compares, for every
sample, every spiking layer's train and the readout's accumulated output after every step
with the bit-exact emulator (``sims.emulator.emulate``). It reports and never raises on a
mismatch: the CLI turns mismatches into exit code 4. (A network Lava cannot run exactly,
i.e. one outside ``loihi2-sim``'s limits, raises ``HardwareLimitError`` from the runner
before anything runs.)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from core.ir import QuantGraph
from sims.lava_pool import run_lava_pool
from sims.lava_runner import run_lava
from sims.reference import encode_input


def verify(q: QuantGraph, net_path: str, x: np.ndarray, y: np.ndarray | None = None, *,
           emulator_result: Any = None, workers: int | None = None,
           progress: bool = False) -> dict[str, Any]:
    """Run ``x`` (N, *input_shape) float samples in Lava from ``net_path`` and compare with
    ``emulator_result`` (an object with ``spikes`` and ``readout`` like ``EmuResult``) or a
    fresh emulator run of ``q``. With ``workers`` the samples run in that many worker
    processes (``sims.lava_pool``: interruptible, watched), else in this process.

    Returns ``{"samples", "accuracy" (Lava's final-step accuracy in percent, as the
    emulator reports it; None without y),
    "spike_mismatches", "readout_mismatches", "seconds" (Lava), "expected_from",
    "first_mismatch": {sample, layer, step (1-based t), neuron, lava, emulator} or None}``."""
    x_int = encode_input(q.input, x)
    if workers is None:  # in this process (tests, benches)
        lava = run_lava(net_path, x_int, progress=progress)
    else:
        lava = run_lava_pool(q, net_path, x_int, workers=workers, progress=progress)
    if emulator_result is None:
        spikes, readout, source = expected_outputs(q, x)
    else:
        spikes, readout, source = emulator_result.spikes, emulator_result.readout, "given"
    spike_count, readout_count, first = _compare(q, lava, spikes, readout)
    accuracy = None
    if y is not None and lava.readout.size:
        pred = np.argmax(lava.readout[-1], axis=1)  # first index on ties, as the emulator
        accuracy = float(np.mean(pred == np.asarray(y).reshape(-1))) * 100.0
    return {"samples": int(x_int.shape[0]), "workers": workers, "accuracy": accuracy,
            "spike_mismatches": spike_count, "readout_mismatches": readout_count,
            "seconds": lava.seconds, "expected_from": source, "first_mismatch": first}


def expected_outputs(q: QuantGraph, x: np.ndarray
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """(spikes layer -> (T, N, n), readout (T, N, K), source name) from the emulator."""
    from sims.emulator import emulate
    result = emulate(q, x, record=True)
    return result.spikes, result.readout, "emulator"


def _compare(q: QuantGraph, lava: Any, spikes: dict[str, np.ndarray], readout: np.ndarray
             ) -> tuple[int, int, dict[str, Any] | None]:
    """Mismatch counts and the first mismatch in (sample, layer order, step, neuron) order:
    the earliest layer is where a fault starts, later ones only inherit it."""
    spike_count, readout_count, firsts = 0, 0, []
    for index, layer in enumerate(q.layers):
        if layer.readout:
            got, want = lava.readout, np.asarray(readout)
        else:
            got, want = lava.spikes[layer.name], np.asarray(spikes[layer.name])
        diff = got.astype(np.int64) != want.astype(np.int64)
        if layer.readout:
            readout_count += int(diff.sum())
        else:
            spike_count += int(diff.sum())
        if diff.any():
            t, k, i = min(zip(*np.nonzero(diff)), key=lambda p: (p[1], p[0], p[2]))
            firsts.append(((int(k), index, int(t), int(i)), {
                "sample": int(k), "layer": layer.name, "step": int(t) + 1, "neuron": int(i),
                "lava": int(got[t, k, i]), "emulator": int(want[t, k, i])}))
    first = min(firsts, key=lambda f: f[0])[1] if firsts else None
    return spike_count, readout_count, first
