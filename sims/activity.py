"""Per-neuron activity of a ``QuantGraph`` on a data set, for the netlist's synops and energy.

The spikes come from the bit-exact emulator: ``EmuResult.neuron_spikes`` holds each neuron's
spikes over all samples and steps, so the pipeline derives the activity from its evaluation
pass (``activity_from_counts``) instead of emulating the data set a second time;
``measure_activity`` emulates first, for callers without a pass at hand. Per neuron the result
is the mean number of spikes per sample (summed over the T steps), and for the input the mean
number of graded-spike events (non-zero payloads of ``sims.reference.encode_input``, sent at
every step), and per layer the mean number of -1 spikes a signed layer sends (its
take-backs, already counted among its spikes). It is the ``activity`` argument of
``exporters.netlist.build_netlist``. In a data-parallel run (``core.distributed``) each rank
passes its shard and gets the totals of all ranks.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from core import distributed
from core.ir import QuantGraph
from hw_targets import get_target
from sims.emulator import emulate
from sims.reference import encode_input


def measure_activity(q: QuantGraph, x: np.ndarray, *, batch_size: int = 256,
                     source: str = "") -> dict[str, Any]:
    """``{"samples", "source", "input_events" (n_in,), "spikes": {layer: (n,)},
    "negative_spikes": {layer: float}}``, all means per sample over the T steps."""
    result = emulate(q, np.asarray(x), batch_size=batch_size)
    return activity_from_counts(q, x, result.neuron_spikes, batch_size=batch_size,
                                source=source, negative_spikes=result.negative_spikes)


def activity_from_counts(q: QuantGraph, x: np.ndarray, neuron_spikes: Mapping[str, np.ndarray],
                         *, batch_size: int = 256, source: str = "",
                         negative_spikes: Mapping[str, int] | None = None) -> dict[str, Any]:
    """``measure_activity``'s result from an emulation's ``neuron_spikes`` (and
    ``negative_spikes``; None counts none) on ``x``."""
    x = np.asarray(x)
    events = np.zeros(int(np.prod(q.input.shape)))
    payload = get_target(q.target).input_payload_bits
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        events += q.timesteps * (encode_input(q.input, xb, payload) != 0).reshape(
            len(xb), -1).sum(axis=0)
    # Data-parallel runs: every rank counted its shard; counts add up exactly.
    total = distributed.sum_int(len(x))
    events = distributed.all_sum(torch.from_numpy(events)).numpy()
    spikes = {layer.name: distributed.all_sum(torch.from_numpy(
                  np.asarray(neuron_spikes[layer.name], np.float64))).numpy()
              for layer in q.layers if not layer.readout}
    negative_spikes = negative_spikes or {}
    negatives = {layer.name: distributed.sum_int(int(negative_spikes.get(layer.name, 0)))
                 for layer in q.layers if not layer.readout}
    n = max(total, 1)
    return {"samples": total, "source": source, "input_events": events / n,
            "spikes": {k: v / n for k, v in spikes.items()},
            "negative_spikes": {k: v / n for k, v in negatives.items()}}
