"""FTBC with the authors' loop structure and the same math, for tests and benchmarks only.

For each iteration, batch, spiking layer l and step t: one full ANN forward and one step of
the whole SNN (all layers, stateful), then ``b_l[t] += alpha * (target_c(t) - theta mean_c(s))``
and layer l's step is re-fired (``target_c(t)``: the paper's mean_c(abar), or with
``step_target="ideal"`` the ideal neuron's firing at step t, shifted to sum to T mean_c(abar),
as ``toolchain.calibrate.step_targets``, written again here): L x T
full-network forwards per batch, nothing cached, no holdout
rule. With one batch and one iteration it computes what ``toolchain.calibrate.calibrate``
computes with ``holdout=0`` (same loop order then). Written in plain torch on the IR, apart
from the engine, so that the two can be compared.
"""
from __future__ import annotations

import numpy as np
import torch

from core.ir import INPUT, AnnGraph, SnnGraph
from sims.torch_snn import encode_input, synapse_current
from toolchain import calibrate as cal
from toolchain.ann import ann_forward


def ftbc_full_forward(snn: SnnGraph, ann: AnnGraph, batches: list[np.ndarray], *,
                      alpha: float = 0.5, iterations: int = 1,
                      step_target: str = "paper") -> SnnGraph:
    """The calibrated graph (module docstring)."""
    scheds = {l.name: torch.tensor(_schedule(snn, l), dtype=cal.DTYPE)
              for l in snn.layers if not l.readout}
    with torch.no_grad():
        for _ in range(iterations):
            for xb in batches:
                for layer in snn.layers:
                    if not layer.readout:
                        _full_forward_layer(snn, ann, xb, layer, scheds, alpha,
                                            step_target)
    return cal._with_schedules(snn, scheds, "ftbc")


def _schedule(snn: SnnGraph, layer) -> np.ndarray:
    shape = (snn.timesteps, layer.channels) + (1,) * (len(layer.shape) - 1)
    sched = np.zeros(shape[:2]) if layer.bias_schedule is None else layer.bias_schedule
    return np.asarray(sched).reshape(shape)


def _params(snn: SnnGraph, layer, scheds: dict) -> dict:
    view = (layer.channels,) + (1,) * (len(layer.shape) - 1)
    as_t = lambda a: torch.tensor(np.asarray(a), dtype=cal.DTYPE).reshape(view)  # noqa: E731
    theta = as_t(np.broadcast_to(layer.threshold, (layer.channels,)))
    sched = scheds.get(layer.name)
    return {"theta": theta, "bias": as_t(np.broadcast_to(layer.bias, (layer.channels,))),
            "v_init": as_t(np.broadcast_to(layer.v_init, (layer.channels,))) * theta,
            "schedule": torch.tensor(_schedule(snn, layer), dtype=cal.DTYPE)
            if sched is None else sched, "readout": layer.readout, "signed": layer.signed}


def _full_forward_layer(snn, ann, xb, layer, scheds, alpha, step_target) -> None:
    params = {l.name: _params(snn, l, scheds) for l in snn.layers}
    x = encode_input(snn.input, xb, cal.DTYPE)
    state = {l.name: params[l.name]["v_init"].expand((len(xb),) + tuple(l.shape)).clone()
             for l in snn.layers}
    counts = {l.name: torch.zeros_like(state[l.name]) for l in snn.layers}  # signed layers
    p = params[layer.name]
    for t in range(snn.timesteps):
        _, values = ann_forward(ann, xb, record=True, dtype=cal.DTYPE)
        target = torch.minimum(values[layer.name].clamp(min=0), p["theta"])
        node = ann.node(layer.name)  # a QCFS layer's ideal neuron gets the activation's input
        current = (torch.minimum(values[node.inputs[0]].clamp(min=0), p["theta"])
                   if type(node).__name__ == "QcfsNode" else target)
        v_prev, cur, spikes, n_prev = _network_step(snn, params, state, counts, x, t,
                                                    layer.name)
        goal = (cal.channel_mean(target) if step_target == "paper"
                else _ideal_target(target, current, p, t, snn.timesteps))
        p["schedule"][t] += alpha * (goal - p["theta"] * cal.channel_rate(spikes))
        pre = v_prev + cur + p["bias"] + p["schedule"][t]
        s = _fire(p, pre, n_prev)
        state[layer.name], counts[layer.name] = pre - s * p["theta"], n_prev + s


def _ideal_target(abar, current, p: dict, t: int, steps: int) -> torch.Tensor:
    """Step t's target: theta times the channel's mean number of spikes an IF neuron (v_init,
    theta, reset by subtraction) with constant input ``current`` fires at step t, plus the
    same shift at every step so that the T targets sum to T mean_c(abar)."""
    a, c, theta = abar.double(), current.double(), p["theta"].double()

    def count(k):  # spikes after k steps
        return torch.clamp(torch.floor((p["v_init"].double() + k * c) / theta + cal.TIE), 0, k)

    at_t = cal.channel_mean(count(t + 1) - count(t))
    shift = cal.channel_mean(a) - theta * cal.channel_mean(count(steps)) / steps
    return (theta * at_t + shift).to(abar.dtype)


def _fire(p: dict, v: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Spikes (float) on >=; a signed layer also -1 where v < 0 and its net count is > 0."""
    s = (v >= p["theta"]).to(v.dtype)
    return s - ((v < 0) & (count > 0)).to(v.dtype) if p["signed"] else s


def _step(p: dict, v: torch.Tensor, current, t: int, count: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """((v + I) + bias) + b[t]; spike (``_fire``), reset by subtraction (the readout: no
    spike)."""
    v = v + current + p["bias"] + p["schedule"][t]
    if p["readout"]:
        return v, v
    fired = _fire(p, v, count)
    return v - fired * p["theta"], fired


def _network_step(snn, params, state, counts, x, t, watch):
    """Advance every layer by step t (in place on ``state`` and the signed layers' net
    ``counts``); return the watched layer's membrane before the step, its input current, its
    spikes (float) and its net count before the step."""
    outs, watched = {}, None
    for layer in snn.layers:
        cur = 0
        for syn in layer.synapses:
            src = x if syn.source == INPUT else outs[syn.source]
            cur = cur + synapse_current(syn, src)
        p = params[layer.name]
        v_prev, n_prev = state[layer.name], counts[layer.name]
        state[layer.name], s = _step(p, v_prev, cur, t, n_prev)
        if not layer.readout:
            outs[layer.name] = s.to(cal.DTYPE) * p["theta"]
            counts[layer.name] = n_prev + s
        if layer.name == watch:
            watched = (v_prev, cur, s.to(cal.DTYPE), n_prev)
    return watched
