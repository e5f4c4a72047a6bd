"""Per-neuron activity of a ``QuantGraph`` on a data set, for the netlist's synops and energy.

``measure_activity`` runs the bit-exact emulator (``sims.emulator.emulate`` with
``record=True``) batch by batch and keeps, per neuron, the mean number of spikes per sample
(summed over the T steps), and for the input the mean number of graded-spike events (non-zero
payloads of ``sims.reference.encode_input``, sent at every step). The result is the
``activity`` argument of ``exporters.netlist.build_netlist``. In a data-parallel run
(``toolchain.distributed``) each rank passes its shard and gets the totals of all ranks.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sims.emulator import PAYLOAD_BITS, emulate
from sims.reference import encode_input
from toolchain import distributed
from toolchain.ir import QuantGraph


def measure_activity(q: QuantGraph, x: np.ndarray, *, batch_size: int = 256,
                     source: str = "") -> dict[str, Any]:
    """``{"samples", "source", "input_events" (n_in,), "spikes": {layer: (n,)}}``, all
    means per sample over the T steps. Batches bound the recorded spikes' memory."""
    x = np.asarray(x)
    spikes = {l.name: np.zeros(int(np.prod(l.shape))) for l in q.layers if not l.readout}
    events = np.zeros(int(np.prod(q.input.shape)))
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        events += q.timesteps * (encode_input(q.input, xb, PAYLOAD_BITS) != 0).reshape(
            len(xb), -1).sum(axis=0)
        rec = emulate(q, xb, record=True, batch_size=batch_size).spikes
        for name in spikes:
            spikes[name] += rec[name].sum(axis=(0, 1), dtype=np.int64)
    # Data-parallel runs: every rank measured its shard; counts add up exactly.
    total = distributed.sum_int(len(x))
    events = distributed.all_sum(torch.from_numpy(events)).numpy()
    spikes = {k: distributed.all_sum(torch.from_numpy(v)).numpy() for k, v in spikes.items()}
    n = max(total, 1)
    return {"samples": total, "source": source, "input_events": events / n,
            "spikes": {k: v / n for k, v in spikes.items()}}
