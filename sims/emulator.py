"""Fast, batched, bit-exact emulator of ``sims.reference`` (the integer specification).

The arithmetic (exact integers in float tensors, the static bounds that choose float32 or
float64, the folded sum-pool) is ``sims.engine``'s integer arithmetic for the graph's target;
this module drives it over a data set: encode, batch, chunk time, count, collect.

Speed: the constant input is encoded once and each input synapse runs once per batch (its
current is the same at every step); spike synapses run one conv/matmul over (steps x batch)
rows per time chunk; the neuron loop over t is a few in-place tensor ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch

from core.errors import InputError
from core.ir import QuantGraph
from sims import engine
from sims.engine import (LayerPlan, Plan, initial_state, input_current, run_steps,
                         spike_current)
from sims.progress import progress_bar
from sims.reference import encode_input

CHUNK_ELEMENTS = 1 << 22  # time-chunk size: steps x batch x neurons per layer (16 MB float32)


@dataclass(frozen=True)
class EmuResult:
    """Emulation of N samples over T steps.

    ``accuracy`` (T,) percent correct after each step (None without labels);
    ``predictions`` (T, N) argmax of the readout; ``readout`` (T, N, K) int64 readout
    membrane after each step; ``spike_counts`` layer -> mean spikes per sample (all steps,
    all neurons); ``saturations`` layer -> number of 24-bit membrane clamps;
    ``synapse_clamps`` layer -> number of 24-bit synaptic-output clamps (0 when
    ``validate`` passed); ``neuron_spikes`` layer -> (n,) int64 spikes of each neuron over
    all samples and steps (the activity the netlist's synops come from; a signed layer's
    -1 spikes included); ``negative_spikes`` layer -> the -1 spikes (take-backs) of all its
    neurons over all samples and steps (0 for an IF layer); ``spikes`` layer -> (T, N, n)
    uint8 (a signed layer: int8 -1/0/1) when ``record=True``."""
    accuracy: np.ndarray | None
    predictions: np.ndarray
    readout: np.ndarray
    spike_counts: Mapping[str, float]
    saturations: Mapping[str, int]
    synapse_clamps: Mapping[str, int]
    neuron_spikes: Mapping[str, np.ndarray]
    spikes: Mapping[str, np.ndarray] | None = None
    negative_spikes: Mapping[str, int] = field(default_factory=dict)

    @property
    def readout_trace(self) -> np.ndarray:
        """(N, T, K) int64: sample i's readout in ``reference_run``'s (T, n) layout."""
        return self.readout.transpose(1, 0, 2)


# --------------------------------------------------------------------------- batches

@dataclass
class _Totals:
    """Running totals over batches (mutable accumulator, private): per spiking layer the
    spikes of each neuron (float64, exact integers), saturation and clamp counts, and the
    -1 spikes of the layer (int64 scalar; stays 0 for an IF layer)."""
    neurons: dict[str, torch.Tensor]
    saturations: dict[str, int]
    clamps: dict[str, int]
    negatives: dict[str, torch.Tensor]


def chunk_steps(plans: tuple[LayerPlan, ...], steps: int, batch: int) -> int:
    """Steps per time chunk: spike tensors stay under CHUNK_ELEMENTS per layer (also keeps
    buffers below glibc's mmap threshold, so memory is reused instead of re-faulted)."""
    widest = max(lp.n for lp in plans)
    return max(1, min(steps, CHUNK_ELEMENTS // max(1, widest * batch)))


def step_drive(lp: LayerPlan, const: torch.Tensor | None, a: torch.Tensor, t0: int,
               steps: int) -> torch.Tensor:
    """(steps, B, n) ``(a << act_shift) + bias`` for a chunk with spike inputs (in place)."""
    if const is not None:
        a = a.add_(const)
    batch = a.shape[1]
    bias = lp.schedule[t0:t0 + steps].unsqueeze(1)
    return a.mul_(lp.shift).view(steps, batch, lp.channels, -1).add_(bias).view(steps, batch, -1)


def run_batch(plan: Plan, x_int: np.ndarray, totals: _Totals,
              record: dict[str, np.ndarray] | None, row0: int) -> np.ndarray:
    """Emulate one batch of encoded samples; returns the readout (T, B, K) int64 and
    adds to ``totals`` (and ``record``: spikes at rows row0..)."""
    plans, steps = plan.layers, plan.timesteps
    batch, size = x_int.shape[0], chunk_steps(plans, steps, x_int.shape[0])
    inputs = torch.from_numpy(x_int.astype(np.float32)).to(plan.device)
    state = {lp.name: initial_state(lp, batch) for lp in plans}
    const = {lp.name: input_current(lp, inputs, steps, totals.clamps) for lp in plans}
    buffers = {lp.name: (torch.empty((size, batch, lp.n), dtype=lp.dtype, device=plan.device),
                         torch.empty((batch, lp.n), dtype=lp.dtype, device=plan.device))
               for lp in plans}
    readout = np.zeros((steps, batch, plans[-1].n), dtype=np.int64)
    for t0 in range(0, steps, size):
        chunk, outputs = range(t0, min(steps, t0 + size)), {}
        for lp in plans:
            c = const[lp.name]
            if lp.spiking_inputs:
                a = spike_current(lp, outputs, len(chunk), batch, totals.clamps)
                drive = step_drive(lp, c, a, chunk.start, len(chunk))
            else:
                drive = const[lp.name] = c if chunk.start else c.mul_(lp.shift)  # a << 6, once
            out, scratch = buffers[lp.name][0][:len(chunk)], buffers[lp.name][1]
            totals.saturations[lp.name] += run_steps(lp, drive, state[lp.name], chunk.start,
                                                     out, scratch, biased=lp.spiking_inputs)
            outputs[lp.name] = out
            collect(lp, out, chunk, totals, record, row0, readout)
    return readout


def collect(lp: LayerPlan, out: torch.Tensor, chunk: range, totals: _Totals,
            record: dict[str, np.ndarray] | None, row0: int, readout: np.ndarray) -> None:
    """Store a chunk's readout values, spike totals and (optionally) spike records."""
    if lp.readout:
        readout[chunk.start:chunk.stop] = out.to(torch.float64).cpu().numpy().astype(np.int64)
        return
    # per-neuron counts (a signed layer's -1 spikes count as spikes): float32 column sums
    # are exact (a chunk has < 2**24 rows)
    sent = out.abs() if lp.signed else out
    totals.neurons[lp.name] += sent.reshape(-1, out.shape[-1]).sum(dim=0)
    if lp.signed:
        totals.negatives[lp.name] += (out < 0).sum()
    if record is not None:
        rows = slice(row0, row0 + out.shape[1])
        record[lp.name][chunk.start:chunk.stop, rows] = out.to(
            engine.train_dtype(lp, torch.uint8)).cpu().numpy()


def check_inputs(q: QuantGraph, x: np.ndarray, y: np.ndarray | None) -> None:
    """InputError for shapes that do not match the graph."""
    if x.shape[1:] != tuple(q.input.shape):
        raise InputError(f"emulate: samples have shape {x.shape[1:]}, the network expects "
                         f"{tuple(q.input.shape)}")
    if not q.layers or not q.layers[-1].readout:
        raise InputError("emulate: the last layer must be the readout")
    if y is not None and len(y) != len(x):
        raise InputError(f"emulate: {len(x)} samples but {len(y)} labels")


def emulate(q: QuantGraph, x: np.ndarray, y: np.ndarray | None = None, *,
            batch_size: int = 256, record: bool = False, progress: bool = False,
            device: str | torch.device | None = None) -> EmuResult:
    """Run ``q`` on float samples ``x`` (N, *input shape), bit-exact with
    ``sims.reference`` (input encoded by ``reference.encode_input``) on any torch
    ``device`` (default cpu)."""
    x = np.asarray(x)
    check_inputs(q, x, y)
    plan = engine.compile(q, device=device)
    plans, steps, n = plan.layers, q.timesteps, len(x)
    totals = _Totals({lp.name: torch.zeros(lp.n, dtype=torch.float64, device=plan.device)
                      for lp in plans if not lp.readout},
                     {lp.name: 0 for lp in plans}, {lp.name: 0 for lp in plans},
                     {lp.name: torch.zeros((), dtype=torch.int64, device=plan.device)
                      for lp in plans if not lp.readout})
    spikes = ({lp.name: np.zeros((steps, n, lp.n), np.int8 if lp.signed else np.uint8)
               for lp in plans if not lp.readout} if record else None)
    readout = np.zeros((steps, n, plans[-1].n), dtype=np.int64)
    payload = plan.arithmetic.payload_bits
    with engine.exact_math(), progress_bar(n, "emulate", progress) as bar, torch.no_grad():
        for start in range(0, n, batch_size):
            x_int = encode_input(q.input, x[start:start + batch_size], payload)
            readout[:, start:start + len(x_int)] = run_batch(plan, x_int, totals, spikes, start)
            bar.update(len(x_int))
    return make_result(readout, y, totals, spikes, n)


def make_result(readout: np.ndarray, y: np.ndarray | None, totals: _Totals,
                spikes: dict[str, np.ndarray] | None, n: int) -> EmuResult:
    """Predictions (argmax, first index on ties), accuracy and per-layer totals."""
    predictions = readout.argmax(axis=2)
    accuracy = None
    if y is not None:
        accuracy = (predictions == np.asarray(y)[None, :]).mean(axis=1) * 100.0
    return EmuResult(accuracy=accuracy, predictions=predictions, readout=readout,
                     spike_counts={k: float(v.sum()) / max(n, 1)
                                   for k, v in totals.neurons.items()},
                     neuron_spikes={k: v.cpu().numpy().astype(np.int64)
                                    for k, v in totals.neurons.items()},
                     saturations=dict(totals.saturations),
                     synapse_clamps=dict(totals.clamps), spikes=spikes,
                     negative_spikes={k: int(v) for k, v in totals.negatives.items()})
