"""A naive float64 reference of the SnnGraph equations (``core.ir``): one sample, one
step, one synapse at a time, numpy state; the float engine is tested against it."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from core.ir import INPUT, SnnGraph


def naive_snn(snn: SnnGraph, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample, per-step, per-synapse reference of the IR equations (float64)."""
    out = {}
    for n in range(len(x)):
        v = {l.name: (l.v_init * l.threshold).reshape((-1,) + (1,) * (len(l.shape) - 1))
             * np.ones(l.shape) for l in snn.layers}
        count = {l.name: np.zeros(l.shape) for l in snn.layers}  # signed layers' net count
        for t in range(snn.timesteps):
            for layer in snn.layers:
                cur = 0.0
                for syn in layer.synapses:
                    src = (torch.tensor(x[n:n + 1], dtype=torch.float64)
                           if syn.source == INPUT else _values(snn, out, syn.source, t, n))
                    w = torch.tensor(syn.weight)
                    c = (src.reshape(1, -1) @ w.T if syn.kind == "dense" else
                         F.conv2d(src, w, None, syn.stride, syn.padding, syn.dilation,
                                  syn.groups))
                    cur = cur + c[0].numpy()
                chan = (-1,) + (1,) * (len(layer.shape) - 1)
                vv = v[layer.name] + cur + layer.bias.reshape(chan)
                vv = vv + (0 if layer.bias_schedule is None
                           else layer.bias_schedule[t].reshape(chan))
                arr = out.setdefault(layer.name,
                                     np.zeros((snn.timesteps, len(x)) + layer.shape))
                if layer.readout:
                    arr[t, n] = vv
                else:
                    s = (vv >= layer.threshold.reshape(chan)).astype(np.float64)
                    if layer.signed:
                        s = s - ((vv < 0) & (count[layer.name] > 0))
                        count[layer.name] = count[layer.name] + s
                    arr[t, n] = s
                    vv = vv - s * layer.threshold.reshape(chan)
                v[layer.name] = vv
    return out


def _values(snn, out, name, t, n):
    layer = snn.layer(name)
    theta = layer.threshold.reshape((-1,) + (1,) * (len(layer.shape) - 1))
    return torch.tensor((out[name][t, n] * theta)[None])
