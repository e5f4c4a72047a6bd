"""How close an SNN's output is to the ANN it was converted from, without labels."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.ir import AnnGraph, SnnGraph

BATCH = 256


@torch.no_grad()
def divergence_from_ann(snn: SnnGraph, ann: AnnGraph, x: np.ndarray, *,
                        device: Any = None) -> np.ndarray:
    """Per sample (N,) float64: KL(softmax(ANN logits) || softmax(SNN logits)), the SNN's
    logits being its readout after the last step over T (the readout integrates the ANN's
    output layer once per step, so readout / T estimates the ANN's logits)."""
    from sims import engine
    from sims.engine import FloatArithmetic
    from sims.torch_snn import run_network
    from toolchain.ann import ann_forward
    steps = snn.timesteps
    plan = engine.compile(snn, FloatArithmetic(torch.float32), device)
    out = []
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH]
        ann_logits = ann_forward(ann, batch).double()
        snn_logits = run_network(snn, batch, plan=plan).readout[-1].double().cpu() / steps
        p_log, q_log = ann_logits.log_softmax(1), snn_logits.log_softmax(1)
        out.append((p_log.exp() * (p_log - q_log)).sum(1).numpy())
    return np.concatenate(out) if out else np.zeros(0)
