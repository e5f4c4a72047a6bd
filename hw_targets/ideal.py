"""The idealised ``float`` target.

Quantization is the identity here in the strongest sense: the quantizer is skipped
(``quantized=False``), no ``QuantGraph`` exists, and every later stage works on the float
``SnnGraph`` (scored by ``sims.torch_snn``). This lets every stage be tested without any
fixed-point effect. ``exporters.quantize.quantize`` refuses this target with an InputError;
``validate`` returns no violations. The integer limits keep their Loihi defaults only so
that the record is complete; nothing reads them for this target.
"""
from __future__ import annotations

from hw_targets.base import Target, registered


@registered
def ideal_float() -> Target:
    """Float SNN, no quantization, no Lava run."""
    return Target(name="float", quantized=False,
                  description="idealised float SNN (no quantization, no Lava)")


@registered
def nir_graph() -> Target:
    """The calibrated float SNN as a NIR graph (exporters/nir_export.py); no quantization."""
    return Target(name="nir", quantized=False,
                  description="NIR graph of the calibrated float SNN (network.nir) for other "
                              "neuromorphic platforms")
