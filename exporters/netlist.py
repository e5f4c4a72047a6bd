"""Hardware netlist and resource estimate of a ``QuantGraph`` on Loihi 2 (``netlist.json``).

What it says, per layer: neurons, synapses (non-zero weights counted over the connections
they really make), fan-in and fan-out, weight bits, bias-schedule size, and which neurocores
hold which neurons under the chip's limits (``hw_targets/loihi2_resources.py``); in total the
cores and chips. With ``activity`` (measured by ``sims.activity.measure_activity`` on the
evaluation set) it adds spikes and synaptic operations per inference beside the ANN's
multiply-accumulates, and an energy estimate. The schema is documented in ``docs/netlist.md``.

Counting rules
--------------
* A conv synapse's connections: for every output neuron (o, y, x), the non-zero taps
  w[o, c, i, j] whose input position (y*s - p + i*d, x*s - p + j*d) lies inside the source
  (taps on padding connect to nothing). Dense: the non-zero entries of the weight matrix.
* fan-in of a neuron: its connections; fan-out of a source neuron: the connections it drives,
  over every synapse that reads it. Synops = sum over source neurons of events x fan-out.
* ANN MACs: the full kernel at every output position (the usual count: zero weights and
  padding taps included), dense O x I. A kernel that is an average pool folded into the
  next layer (constant on aligned 2x2 blocks, stride 2: what ``toolchain.convert`` makes) is
  counted as the ANN computed it: pool (adds, not MACs) then the 4x smaller kernel.
* Placement: every layer gets cores of its own (the input is injected by the host/embedded
  CPUs, not a neurocore). A layer's neurons are put in placement order (conv-shaped layers
  position-major, (H, W, C), so one core holds every channel of a spatial tile: the channels
  at one position read the same inputs; flat layers in index order) and cut into k
  contiguous ranges, with the smallest k for which every range fits the core limits. A limit
  that one neuron alone exceeds is reported as a violation and ignored for the split.
  Distinct input axons of a conv range are counted over the union of its positions and of
  its channels' taps: exact when the range covers whole positions (all channels) or one
  channel, an upper bound otherwise.

No torch and no ``sims`` import here. Output is deterministic: fixed key order, no
timestamps, written atomically.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from core.errors import InputError
from core.ir import INPUT, QLayer, QSynapse, QuantGraph, SynapseKind
from hw_targets import Target
from hw_targets.timing import synaptic_delays
from hw_targets.loihi2_resources import ChipResources, describe, resources_for

FORMAT = "ftbc-netlist"
VERSION = 3   # 2: layers say "depth" (v1: "delay"), synapses "delay", delay slots counted;
#               3: neuron kind if+signed, neuron state bits, synapses' message bits,
#                  negative spikes in the activity


# =========================================================================== connectivity

@dataclass(frozen=True)
class Connectivity:
    """Exact connection counts of one synapse: ``fan_in`` per output neuron and ``fan_out``
    per source neuron (both flat, C order), and the ANN MACs of the same map."""
    source: str
    kind: SynapseKind
    fan_in: np.ndarray
    fan_out: np.ndarray
    weights_nonzero: int
    macs: int
    pool_folded: bool

    @property
    def connections(self) -> int:
        return int(self.fan_in.sum())


def tap_valid(out_size: int, in_size: int, k: int, s: int, p: int, d: int) -> np.ndarray:
    """(out_size, k) bool: output position y with tap i reads input y*s - p + i*d in range."""
    pos = np.arange(out_size)[:, None] * s - p + np.arange(k)[None, :] * d
    return (pos >= 0) & (pos < in_size)


def tap_hits(out_size: int, in_size: int, k: int, s: int, p: int, d: int) -> np.ndarray:
    """(in_size, k) int: how many output positions read input position y through tap i."""
    hits = np.zeros((in_size, k), dtype=np.int64)
    valid = tap_valid(out_size, in_size, k, s, p, d)
    pos = np.arange(out_size)[:, None] * s - p + np.arange(k)[None, :] * d
    for i in range(k):
        np.add.at(hits[:, i], pos[valid[:, i], i], 1)
    return hits


def per_input_channel(nz: np.ndarray, groups: int) -> np.ndarray:
    """(C_in, kH, kW): non-zero taps summed over the output channels that read each input
    channel (grouped conv: only the outputs of its group)."""
    o, ig, kh, kw = nz.shape
    return nz.reshape(groups, o // groups, ig, kh, kw).sum(axis=1).reshape(groups * ig, kh, kw)


def conv_counts(syn: QSynapse, src: tuple[int, ...], out: tuple[int, ...]
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-neuron fan-in (O, OH, OW) and per-source fan-out (C, H, W) of a conv."""
    nz = (np.asarray(syn.weight) != 0).astype(np.int64)
    (_, h, w), (_, oh, ow) = src, out
    geo = list(zip(syn.stride, syn.padding, syn.dilation))
    kh, kw = nz.shape[2:]
    vh, vw = (tap_valid(oh, h, kh, *geo[0]).astype(np.int64),
              tap_valid(ow, w, kw, *geo[1]).astype(np.int64))
    fan_in = np.einsum("oij,hi,wj->ohw", nz.sum(axis=1), vh, vw)
    uh, uw = tap_hits(oh, h, kh, *geo[0]), tap_hits(ow, w, kw, *geo[1])
    fan_out = np.einsum("cij,yi,xj->cyx", per_input_channel(nz, syn.groups), uh, uw)
    return fan_in.ravel(), fan_out.ravel()


def blocks_constant(w: np.ndarray) -> bool:
    """True if the last two axes of ``w`` are constant on aligned 2 x 2 blocks (a folded
    2 x 2 average pool; same rule as the emulator's sum-pool shortcut)."""
    *lead, h, wd = w.shape
    if h % 2 or wd % 2:
        return False
    blocks = w.reshape(*lead, h // 2, 2, wd // 2, 2)
    return bool(np.all(blocks == blocks[..., :1, :, :1]))


def folded_pool(syn: QSynapse, src: tuple[int, ...]) -> bool:
    """True when ``syn`` is a 2 x 2 average pool folded into the next weighted layer."""
    if len(src) != 3 or src[1] % 2 or src[2] % 2:
        return False
    w = np.asarray(syn.weight)
    if syn.kind is SynapseKind.DENSE:
        return blocks_constant(w.reshape(w.shape[0], *src))
    return (tuple(syn.stride) == (2, 2) and tuple(syn.dilation) == (1, 1)
            and syn.padding[0] % 2 == 0 and syn.padding[1] % 2 == 0 and blocks_constant(w))


def ann_macs(syn: QSynapse, out: tuple[int, ...], pooled: bool) -> int:
    """MACs of the ANN layer this synapse came from (module docstring)."""
    w = np.asarray(syn.weight)
    per_output = int(np.prod(w.shape[1:]))
    macs = int(np.prod(out)) * per_output
    return macs // 4 if pooled else macs


def connectivity(syn: QSynapse, src: tuple[int, ...], out: tuple[int, ...]) -> Connectivity:
    """Exact connection counts of one synapse (dense or conv)."""
    if syn.kind is SynapseKind.CONV:
        fan_in, fan_out = conv_counts(syn, src, out)
    elif syn.kind is SynapseKind.DENSE:
        nz = np.asarray(syn.weight) != 0
        fan_in, fan_out = nz.sum(axis=1), nz.sum(axis=0)
    else:
        raise InputError(f"netlist: unknown synapse kind {syn.kind!r} from {syn.source}")
    pooled = folded_pool(syn, src)
    return Connectivity(source=syn.source, kind=syn.kind, fan_in=fan_in.astype(np.int64),
                        fan_out=fan_out.astype(np.int64),
                        weights_nonzero=int(np.count_nonzero(syn.weight)),
                        macs=ann_macs(syn, out, pooled), pool_folded=pooled)


def graph_connectivity(q: QuantGraph) -> dict[str, tuple[Connectivity, ...]]:
    """Connectivity of every synapse, by layer name."""
    shapes = shapes_of(q)
    return {layer.name: tuple(connectivity(s, shapes[s.source], tuple(layer.shape))
                              for s in layer.synapses) for layer in q.layers}


def shapes_of(q: QuantGraph) -> dict[str, tuple[int, ...]]:
    return {INPUT: tuple(q.input.shape), **{l.name: tuple(l.shape) for l in q.layers}}


# =========================================================================== placement

def even_ranges(n: int, k: int) -> list[tuple[int, int]]:
    """k contiguous ranges covering 0..n, sizes differing by at most one."""
    edges = [round(i * n / k) for i in range(k + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def placement_order(shape: tuple[int, ...]) -> np.ndarray:
    """Flat C-order indices of a layer's neurons in placement order: position-major
    (H, W, C) for conv-shaped layers, so a core holds every channel of a spatial tile (the
    channels at one position share their inputs), plain order for flat layers."""
    n = int(np.prod(shape))
    if len(shape) != 3:
        return np.arange(n)
    return np.arange(n).reshape(shape).transpose(1, 2, 0).ravel()


def spatial_reach(positions: np.ndarray, syn: QSynapse, src: tuple[int, ...],
                  out: tuple[int, ...]) -> np.ndarray:
    """(kH*kW, H*W) bool: input positions each tap reads from the given output positions."""
    (_, h, w), ow = src, out[2]
    kh, kw = np.asarray(syn.weight).shape[2:]
    ys, xs = positions // ow, positions % ow
    reach = np.zeros((kh, kw, h, w), dtype=bool)
    for i in range(kh):
        for j in range(kw):
            y = ys * syn.stride[0] - syn.padding[0] + i * syn.dilation[0]
            x = xs * syn.stride[1] - syn.padding[1] + j * syn.dilation[1]
            ok = (y >= 0) & (y < h) & (x >= 0) & (x < w)
            reach[i, j, y[ok], x[ok]] = True
    return reach.reshape(kh * kw, h * w)


def members_axons(syn: QSynapse, src: tuple[int, ...], out: tuple[int, ...],
                  members: np.ndarray) -> int:
    """Distinct source neurons feeding the output neurons ``members`` (flat C-order
    indices) through ``syn``. Conv: the union of the members' channels' taps over the union
    of their positions (exact when they cover whole positions or one channel, else an upper
    bound)."""
    w = np.asarray(syn.weight) != 0
    if syn.kind is SynapseKind.DENSE:
        return int(w[members].any(axis=0).sum())
    plane = out[1] * out[2]
    rows = np.zeros(w.shape[0], dtype=bool)
    rows[np.unique(members // plane)] = True
    taps = per_input_channel((w & rows[:, None, None, None]).astype(np.int64), syn.groups)
    reach = spatial_reach(np.unique(members % plane), syn, src, out)
    used = (taps.reshape(taps.shape[0], -1) > 0).astype(np.int64) @ reach.astype(np.int64)
    return int((used > 0).sum())


def channels_of(layer: QLayer, members: np.ndarray) -> np.ndarray:
    """Channels with at least one neuron among ``members``."""
    return np.unique(members // int(np.prod(layer.shape[1:])))


def members_synapse_bits(layer: QLayer, conns: tuple[Connectivity, ...], members: np.ndarray,
                         res: ChipResources, weight_bits: int) -> int:
    """Synaptic memory of ``members``: every connection stored, or (conv with weight
    sharing) the non-zero kernel of each of their output channels once."""
    bits = weight_bits + res.limits.synapse_overhead_bits
    total = 0
    for syn, conn in zip(layer.synapses, conns):
        if syn.kind is SynapseKind.CONV and res.limits.conv_weight_sharing:
            nz = np.count_nonzero(np.asarray(syn.weight)[channels_of(layer, members)])
            total += int(nz) * bits
        else:
            total += int(conn.fan_in[members].sum()) * bits
    return total


def delay_slots(neurons: int, delays: tuple[int, ...]) -> int:
    """Dendritic accumulator slots of ``neurons`` whose synapses carry ``delays``: one per
    step still to come, 1 + the longest delay each."""
    return neurons * (1 + max(delays, default=0))


def state_bits(layer: QLayer, bits: Mapping[str, int]) -> int:
    """Neuron state bits of one neuron of ``layer``: the membrane v (and a signed neuron's
    net spike count, a second word of the same width, as in sims/lava_procs)."""
    return bits["state"] * (2 if layer.signed else 1)


def neuron_kind(layer: QLayer) -> str:
    return "readout" if layer.readout else "if+signed" if layer.signed else "if"


def members_usage(layer: QLayer, conns: tuple[Connectivity, ...], shapes: Mapping,
                  members: np.ndarray, res: ChipResources, bits: Mapping[str, int],
                  timesteps: int, delays: tuple[int, ...] = ()) -> dict[str, int]:
    """What the neurons ``members`` of ``layer`` need on one core."""
    axons = sum(members_axons(s, shapes[s.source], tuple(layer.shape), members)
                for s in layer.synapses)
    return {"neurons": int(members.size),
            "synapses": int(sum(c.fan_in[members].sum() for c in conns)),
            "synapse_memory_bits": members_synapse_bits(layer, conns, members, res,
                                                        bits["weight"]),
            "fan_in_axons": axons,
            "bias_schedule_bits": channels_of(layer, members).size * timesteps * bits["bias"],
            "delay_slots": delay_slots(int(members.size), delays),
            "neuron_state_bits": int(members.size) * state_bits(layer, bits)}


LIMIT_OF = {"neurons": "neurons_per_core", "synapse_memory_bits": "synapse_memory_bits_per_core",
            "fan_in_axons": "fan_in_axons_per_core",
            "bias_schedule_bits": "bias_memory_bits_per_core",
            "delay_slots": "delay_slots_per_core",
            "neuron_state_bits": "neuron_state_bits_per_core"}


def overload(usage: Mapping[str, int], res: ChipResources, ignore: set[str]) -> float:
    """Largest usage / limit over the checked quantities (<= 1 means it fits)."""
    return max(usage[q] / getattr(res.limits, lim) for q, lim in LIMIT_OF.items()
               if q not in ignore)


def single_neuron_violations(layer: QLayer, conns, shapes, res, bits, timesteps, delays
                             ) -> tuple[list[dict[str, Any]], set[str]]:
    """Limits that even the neediest single neuron exceeds (no split can satisfy them)."""
    needs = np.sum([c.fan_in for c in conns], axis=0) if conns else np.zeros(1)
    worst = int(np.argmax(needs))
    usage = members_usage(layer, conns, shapes, np.array([worst]), res, bits, timesteps,
                          delays)
    bad = {q for q, lim in LIMIT_OF.items() if usage[q] > getattr(res.limits, lim)}
    return [violation(layer.name, q, usage[q], LIMIT_OF[q], res, "one neuron alone")
            for q in sorted(bad)], bad


def violation(layer: str, quantity: str, value: int, limit: str, res: ChipResources,
              why: str) -> dict[str, Any]:
    rec = describe(res)[limit]
    return {"layer": layer, "quantity": quantity, "value": int(value), "limit": limit,
            "limit_value": rec["value"], "limit_source": rec["source"], "why": why}


def place_layer(layer: QLayer, conns, shapes, res: ChipResources, bits, timesteps,
                delays: tuple[int, ...] = ()
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Core ranges of one layer in placement order (smallest k that fits) and the
    violations found; ``delays`` are its synapses' synaptic delays."""
    order = placement_order(tuple(layer.shape))
    n = order.size
    problems, ignore = single_neuron_violations(layer, conns, shapes, res, bits, timesteps,
                                                delays)
    k = max(1, math.ceil(n / res.limits.neurons_per_core))
    while True:
        ranges = even_ranges(n, k)
        usage = [members_usage(layer, conns, shapes, order[a:b], res, bits, timesteps,
                               delays) for a, b in ranges]
        worst = max(overload(u, res, ignore) for u in usage)
        if worst <= 1.0 or k >= n:
            break
        k = min(n, max(k + 1, math.ceil(k * worst)))
    return [{"range": [a, b], **u} for (a, b), u in zip(ranges, usage)], problems


# =========================================================================== netlist

def stats(values: np.ndarray) -> dict[str, float]:
    """max (int) and mean (float, 4 decimals) of a count array."""
    if values.size == 0:
        return {"max": 0, "mean": 0.0}
    return {"max": int(values.max()), "mean": round(float(values.mean()), 4)}


def fan_outs(q: QuantGraph, conns: Mapping[str, tuple[Connectivity, ...]]
             ) -> dict[str, np.ndarray]:
    """Per source (input and every layer): fan-out of each neuron over all its readers."""
    shapes = shapes_of(q)
    out = {name: np.zeros(int(np.prod(shape)), dtype=np.int64) for name, shape in shapes.items()}
    for layer_conns in conns.values():
        for c in layer_conns:
            out[c.source] += c.fan_out
    return out


def synapse_record(syn: QSynapse, conn: Connectivity, weight_bits: int,
                   delay: int, message_bits: int) -> dict[str, Any]:
    return {"source": syn.source, "kind": syn.kind.value, "weight_shape": list(syn.weight.shape),
            "weights_nonzero": conn.weights_nonzero, "connections": conn.connections,
            "weight_bits": weight_bits, "weight_exp": int(syn.weight_exp), "delay": int(delay),
            "message_bits": int(message_bits),
            "stride": list(syn.stride), "padding": list(syn.padding),
            "dilation": list(syn.dilation), "groups": int(syn.groups),
            "ann_macs": conn.macs, "pool_folded": conn.pool_folded}


def bias_record(layer: QLayer, mant_bits: int) -> dict[str, Any]:
    t, c = np.asarray(layer.bias_mant).shape
    return {"timesteps": int(t), "channels": int(c), "mantissas": int(t * c),
            "mantissa_bits": mant_bits, "exponent": int(layer.bias_exp),
            "bits": int(t * c * mant_bits)}


def layer_record(layer: QLayer, conns, fan_out: np.ndarray, cores: list, bits,
                 delays: tuple[int, ...], messages: Mapping[str, int]) -> dict:
    fan_in = np.sum([c.fan_in for c in conns], axis=0)
    n = int(np.prod(layer.shape))
    return {"name": layer.name, "origin": layer.origin,
            "kind": neuron_kind(layer), "shape": list(layer.shape),
            "neurons": n, "neuron_state_bits": state_bits(layer, bits),
            "depth": int(layer.depth), "delay_slots": delay_slots(n, delays),
            "vth": {"min": int(np.min(layer.vth)), "max": int(np.max(layer.vth))},
            "synapses": [synapse_record(s, c, bits["weight"], d, messages[s.source])
                         for s, c, d in zip(layer.synapses, conns, delays)],
            "connections": int(fan_in.sum()), "fan_in": stats(fan_in), "fan_out": stats(fan_out),
            "weight_bits": bits["weight"], "bias_schedule": bias_record(layer, bits["bias"]),
            "placement_order": "hwc" if len(layer.shape) == 3 else "flat", "cores": cores}


def signed_bits(lo: int, hi: int) -> int:
    """Width of a two's-complement field holding lo..hi."""
    return max((-int(lo) - 1).bit_length() if lo < 0 else 0, int(hi).bit_length()) + 1


def build_netlist(q: QuantGraph, target: Target, activity: Mapping[str, Any] | None = None,
                  resources: ChipResources | None = None) -> dict[str, Any]:
    """The netlist of ``q`` on ``target`` (schema: docs/netlist.md). ``resources`` overrides
    the target's chip resources (tests use small cores); ``activity`` as returned by
    ``sims.activity.measure_activity`` (or None)."""
    res = resources or resources_for(target.name)
    if res is None:
        raise InputError(f"netlist: target {target.name!r} is not a chip (no core limits); "
                         f"use --target loihi2")
    bits = {"weight": target.weight_bits,
            "bias": signed_bits(target.bias_mant_min, target.bias_mant_max),
            "state": target.state_bits}
    messages = {INPUT: target.message_bits(None),
                **{l.name: target.message_bits(l.signed) for l in q.layers}}
    conns, shapes, delays = graph_connectivity(q), shapes_of(q), synaptic_delays(q.layers)
    outs, layers, violations, first = fan_outs(q, conns), [], [], 0
    for layer in q.layers:
        cores, problems = place_layer(layer, conns[layer.name], shapes, res, bits, q.timesteps,
                                      delays[layer.name])
        for i, core in enumerate(cores):
            core["core"] = first + i
        first += len(cores)
        layers.append(layer_record(layer, conns[layer.name], outs[layer.name], cores, bits,
                                   delays[layer.name], messages))
        violations += problems
    return assemble(q, target, res, layers, violations, outs, conns, activity)


def assemble(q, target, res, layers, violations, outs, conns, activity) -> dict[str, Any]:
    """Top-level record in the documented key order."""
    cores = sum(len(l["cores"]) for l in layers)
    n_in = int(np.prod(q.input.shape))
    totals = {"neurons": sum(l["neurons"] for l in layers),
              "signed_neurons": sum(l["neurons"] for l in layers if l["kind"] == "if+signed"),
              "neuron_state_bits": sum(l["neurons"] * l["neuron_state_bits"] for l in layers),
              "connections": sum(l["connections"] for l in layers),
              "weights_nonzero": sum(s["weights_nonzero"] for l in layers for s in l["synapses"]),
              "bias_schedule_bits": sum(l["bias_schedule"]["bits"] for l in layers),
              "delay_slots": sum(l["delay_slots"] for l in layers),
              "delayed_connections": sum(s["connections"] for l in layers
                                         for s in l["synapses"] if s["delay"]),
              "graded_connections": sum(s["connections"] for l in layers
                                        for s in l["synapses"] if s["message_bits"]),
              "ann_macs": sum(s["ann_macs"] for l in layers for s in l["synapses"]),
              "cores": cores, "chips": math.ceil(cores / res.limits.cores_per_chip)}
    return {"format": FORMAT, "version": VERSION, "target": target.name,
            "timesteps": int(q.timesteps), "resources": describe(res),
            "input": {"shape": list(q.input.shape), "neurons": n_in,
                      "fan_out": stats(outs[INPUT])},
            "layers": layers, "totals": totals,
            "fits": not violations, "violations": violations,
            "activity": None if activity is None else activity_record(q, conns, outs, activity, res)}


# =========================================================================== activity

def synops(events: Any, fan_out: np.ndarray) -> tuple[float, str]:
    """Synaptic operations of one source: exact with per-neuron events, else mean fan-out."""
    ev = np.asarray(events, dtype=np.float64)
    if ev.ndim == 0:
        return float(ev) * float(fan_out.mean() if fan_out.size else 0.0), "mean_fan_out"
    return float(ev.ravel() @ fan_out.astype(np.float64)), "per_neuron"


def events_of(activity: Mapping[str, Any], source: str) -> Any:
    if source == INPUT:
        return activity["input_events"]
    return activity["spikes"].get(source, 0.0)


def layer_activity(layer: QLayer, conns, activity, timesteps: int) -> dict[str, Any]:
    """Spikes sent and synops received by one layer, per inference."""
    ops, methods = 0.0, set()
    for c in conns:
        value, method = synops(events_of(activity, c.source), c.fan_out)
        ops, methods = ops + value, methods | {method}
    spikes = 0.0 if layer.readout else float(np.sum(activity["spikes"].get(layer.name, 0.0)))
    negative = float(activity.get("negative_spikes", {}).get(layer.name, 0.0))
    n = int(np.prod(layer.shape))
    return {"name": layer.name, "spikes": round(spikes, 4),
            "negative_spikes": round(negative, 4),
            "spike_rate": round(spikes / (n * timesteps), 6), "synops": round(ops, 4),
            "neuron_updates": n * timesteps, "ann_macs": sum(c.macs for c in conns),
            "synops_method": "/".join(sorted(methods))}


def energy_record(total: Mapping[str, float], res: ChipResources) -> dict[str, Any]:
    """Energy per inference in nJ (ESTIMATE: per-op figures from loihi2_resources)."""
    e = res.energy
    parts = {"synops_nj": total["synops"] * e.synop_pj / 1e3,
             "neuron_updates_nj": total["neuron_updates"] * e.neuron_update_pj / 1e3,
             "spikes_nj": (total["spikes"] + total["input_events"]) * e.spike_pj / 1e3}
    snn = sum(parts.values())
    return {"estimate": True, **{k: round(v, 4) for k, v in parts.items()},
            "snn_total_nj": round(snn, 4),
            "ann_int8_nj": round(total["ann_macs"] * e.ann_mac_int8_pj / 1e3, 4),
            "ann_fp32_nj": round(total["ann_macs"] * e.ann_mac_fp32_pj / 1e3, 4)}


def activity_record(q: QuantGraph, conns, outs, activity: Mapping[str, Any],
                    res: ChipResources) -> dict[str, Any]:
    """Per-layer and total activity per inference, with the energy estimate."""
    layers = [layer_activity(l, conns[l.name], activity, q.timesteps) for l in q.layers]
    total = {k: round(sum(l[k] for l in layers), 4)
             for k in ("spikes", "negative_spikes", "synops", "neuron_updates", "ann_macs")}
    total["input_events"] = round(float(np.sum(activity["input_events"])), 4)
    total["synops_per_ann_mac"] = round(total["synops"] / max(total["ann_macs"], 1), 6)
    return {"samples": int(activity["samples"]), "source": activity.get("source", ""),
            "layers": layers, "totals": total, "energy": energy_record(total, res)}


# =========================================================================== output

def netlist_json(netlist: Mapping[str, Any]) -> str:
    """The file's text: fixed key order (as built), one space indent, trailing newline."""
    return json.dumps(netlist, indent=1, allow_nan=False) + "\n"


def write_netlist(netlist: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``netlist`` as JSON to ``path`` atomically (temporary file + os.replace)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        tmp.write_text(netlist_json(netlist), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _si(x: float) -> str:
    """Compact number: 1234 -> 1.23k, 4.5e6 -> 4.5M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.4g}"


def netlist_summary_lines(netlist: Mapping[str, Any]) -> list[str]:
    """A readable table of the netlist (and activity and energy, when measured)."""
    t = netlist["totals"]
    lines = [f"netlist ({netlist['target']}): {len(netlist['layers'])} layers, "
             f"{_si(t['neurons'])} neurons, {_si(t['connections'])} synapses, "
             f"{t['cores']} cores on {t['chips']} chip(s) (limits partly assumptions, "
             f"see resources)"]
    if t["signed_neurons"]:
        lines.append(f"signed neurons: {_si(t['signed_neurons'])}, two state words each "
                     f"(v and the net spike count); their -1/0/+1 spikes are graded "
                     f"messages ({_si(t['graded_connections'])} graded synapses, input's "
                     f"included)")
    if t["delayed_connections"]:
        lines.append(f"residual inputs aligned by synaptic delays: "
                     f"{_si(t['delayed_connections'])} delayed synapses, "
                     f"{_si(t['delay_slots'])} dendritic delay slots")
    act = {a["name"]: a for a in (netlist["activity"] or {}).get("layers", [])}
    head = (f"{'layer':12s} {'neurons':>8s} {'synapses':>9s} {'fan-in':>11s} {'fan-out':>11s} "
            f"{'cores':>5s}")
    lines.append(head + (f" {'spikes':>8s} {'synops':>8s} {'ANN MACs':>9s}" if act else ""))
    for l in netlist["layers"]:
        row = (f"{l['name'][:12]:12s} {l['neurons']:>8d} {_si(l['connections']):>9s} "
               f"{l['fan_in']['max']:>5d}/{l['fan_in']['mean']:<5.0f} "
               f"{l['fan_out']['max']:>5d}/{l['fan_out']['mean']:<5.0f} {len(l['cores']):>5d}")
        if act:
            a = act[l["name"]]
            row += f" {_si(a['spikes']):>8s} {_si(a['synops']):>8s} {_si(a['ann_macs']):>9s}"
        lines.append(row)
    return lines + activity_lines(netlist) + violation_lines(netlist)


def activity_lines(netlist: Mapping[str, Any]) -> list[str]:
    if not netlist["activity"]:
        return []
    a = netlist["activity"]
    tot, e = a["totals"], a["energy"]
    takes = (f" ({_si(tot['negative_spikes'])} of them -1 take-backs)"
             if tot["negative_spikes"] else "")
    return [f"per inference (mean of {a['samples']} samples): {_si(tot['spikes'])} spikes"
            f"{takes}, "
            f"{_si(tot['synops'])} synops vs {_si(tot['ann_macs'])} ANN MACs "
            f"({tot['synops_per_ann_mac']:.3g} synops/MAC)",
            f"energy estimate: SNN {e['snn_total_nj'] / 1e3:.3g} uJ (synops "
            f"{e['synops_nj'] / 1e3:.3g}, neuron updates {e['neuron_updates_nj'] / 1e3:.3g}, "
            f"spikes {e['spikes_nj'] / 1e3:.3g}); ANN MACs alone int8 "
            f"{e['ann_int8_nj'] / 1e3:.3g} uJ, fp32 {e['ann_fp32_nj'] / 1e3:.3g} uJ"]


def violation_lines(netlist: Mapping[str, Any]) -> list[str]:
    return [f"does not fit: layer {v['layer']}: {v['quantity']} {v['value']} > {v['limit']} "
            f"{v['limit_value']} ({v['limit_source']}; {v['why']})"
            for v in netlist["violations"]]
