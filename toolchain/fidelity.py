"""How close an SNN's output is to the ANN it was converted from, without labels."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from core.ir import AnnGraph, SnnGraph

BATCH = 256


@torch.no_grad()
def ann_log_probs(ann: AnnGraph, x: np.ndarray) -> torch.Tensor:
    """(N, classes) float64: log softmax of the ANN's logits, what ``divergence_from_ann``
    compares with (computed once by a caller that scores several SNNs on the same images)."""
    from toolchain.ann import ann_forward
    out = [ann_forward(ann, x[start:start + BATCH]).double().log_softmax(1)
           for start in range(0, len(x), BATCH)]
    return torch.cat(out) if out else torch.zeros(0, 0, dtype=torch.float64)


@torch.no_grad()
def divergence_from_ann(snn: SnnGraph, ann: AnnGraph, x: np.ndarray, *,
                        device: Any = None, reference: torch.Tensor | None = None) -> np.ndarray:
    """Per sample (N,) float64: KL(softmax(ANN logits) || softmax(SNN logits)), the SNN's
    logits being its readout after the last step over T (the readout integrates the ANN's
    output layer once per step, so readout / T estimates the ANN's logits). ``reference``:
    ``ann_log_probs(ann, x)``, if the caller has it already."""
    from sims import engine
    from sims.engine import FloatArithmetic
    from sims.torch_snn import run_network
    steps = snn.timesteps
    plan = engine.compile(snn, FloatArithmetic(torch.float32), device)
    p_log = ann_log_probs(ann, x) if reference is None else reference
    out = []
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH]
        snn_logits = run_network(snn, batch, plan=plan).readout[-1].double().cpu() / steps
        p, q_log = p_log[start:start + BATCH], snn_logits.log_softmax(1)
        out.append((p.exp() * (p - q_log)).sum(1).numpy())
    return np.concatenate(out) if out else np.zeros(0)
