"""The ``Target`` record (every hardware limit as a named field) and the target registry.

A target is data, not code: ``exporters.quantize`` reads these numbers to choose scales and
``exporters.quantize.validate`` checks a ``QuantGraph`` against them. Each field's comment
names where the number comes from (Lava 0.10 sources in the venv, paths relative to
``site-packages/lava``, or our own encoding conventions in ``sims/reference.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from core.errors import InputError


@dataclass(frozen=True)
class Target:
    """One deployment target. Integer fields are inclusive ranges unless named ``*_bits``."""
    name: str
    description: str
    # False: the idealised float target; the quantizer is skipped and every stage uses the
    # float SnnGraph (see hw_targets/ideal.py).
    quantized: bool = True
    # True: the pipeline runs the exported network in Lava's CPU simulation
    # (Loihi2SimCfg(select_tag='fixed_pt')) and compares it spike for spike.
    simulated: bool = False

    # --- synapses ----------------------------------------------------------------------
    # Dense/Conv fixed-point models clip to num_bits=8 then truncate_weights drops the LSB in
    # SignMode.MIXED (proc/dense/models.py: clip_weights(..., num_bits=8) + truncate_weights;
    # utils/weightutils.py: num_truncate_bits = 8 - num_weight_bits + mixed_flag): effective
    # weights are even integers in [-2**8, 2**8 - 2].
    weight_bits: int = 8
    weight_min: int = -256
    weight_max: int = 254
    weight_step: int = 2
    # Shared weight exponent: a = acc << weight_exp (proc/dense/models.py run_spk). Lava does
    # not range-check it; we take a 4-bit signed field (-8..7, Loihi 1's documented weight
    # exponent; not confirmed for Loihi 2). The quantizer always uses 0, so only hand-built
    # graphs can reach these limits.
    weight_exp_min: int = -8
    weight_exp_max: int = 7
    # Conv's fixed-point model clamps its output to 24 bits
    # (proc/conv/models.py PyConvModelFixed.clamp_precision: signed_clamp(x, bits=24));
    # validate() proves sum_i |w_oi| * max|src_i| stays below this so the clamp never binds.
    synapse_acc_bits: int = 24
    # Graded-spike payload of the input encoding: signed 8 bits, x_int in [-128, 127]
    # (our convention, sims/reference.py encode_input default payload_bits=8; Lava Dense
    # accepts graded spikes when num_message_bits > 0, proc/dense/process.py, carried
    # in 24-bit ports, proc/conv/models.py s_in precision=24).
    input_payload_bits: int = 8
    # A signed layer's spike (sims/reference.py: -1, 0 or +1) travels as a graded payload,
    # 2 bits two's complement; the synapses reading it run with num_message_bits = 2 and
    # multiply the weight by it (sims/lava_procs; carried in the same 24-bit ports as the
    # input's payload). An IF layer's spikes are binary (0 message bits).
    signed_spike_bits: int = 2
    # Lava Dense/Conv deliver at step t what arrived at t-1 (proc/dense/models.py a_buff):
    # one fixed step per hop (hw_targets/timing.py). Loihi 2 synapses add a 6-bit delay
    # field, 0..63 extra steps (proc/sparse/models.py PyDelaySparseModelBitAcc: delays
    # precision=6, a ValueError above 63); it aligns residual inputs, whose shorter paths
    # wait depth(layer) - 1 - depth(source) steps (hw_targets.timing.synapse_delay).
    max_synaptic_delay: int = 63
    # False: conv synapses must have weight_exp 0. Lava's Conv holds a weight_exp Var but
    # never applies it (proc/conv/models.py AbstractPyConvModel.run_spk), so the
    # Lava-verified target cannot run one; Dense and (Delay)Sparse apply it.
    conv_weight_exp: bool = True

    # --- neurons -----------------------------------------------------------------------
    # Bias mantissa: signed 13-bit; exponent: unsigned 3-bit (proc/lif/models.py
    # PyLifModelBitAcc docstring, LavaPyType precision=13 / precision=3); effective bias
    # bias_mant << bias_exp (AbstractPyLifModelFixed.scale_bias).
    bias_mant_min: int = -4096
    bias_mant_max: int = 4095
    bias_exp_min: int = 0
    bias_exp_max: int = 7
    # Membrane/current state: 24-bit signed (AbstractPyLifModelFixed.uv_bitwidth = 24).
    state_bits: int = 24
    # Synaptic input and threshold enter the state shifted left by 6 (act_shift = vth_shift
    # = 6 in AbstractPyLifModelFixed); sims/reference.py ACT_SHIFT. (Lava's name: not to be
    # confused with convert's ``input_shift`` option, the theta/(2T) added to the input.)
    act_shift: int = 6
    # Threshold in state units. Stock LIF: vth unsigned 17-bit << 6, i.e. < 2**23
    # (PyLifModelBitAcc docstring). We cap at 2**22 so v can reach ~2 vth in 24 bits.
    vth_max: int = 1 << 22

    @property
    def state_min(self) -> int:
        """Lowest membrane value, -2**(state_bits-1)."""
        return -(1 << (self.state_bits - 1))

    @property
    def state_max(self) -> int:
        """Highest membrane value, 2**(state_bits-1) - 1."""
        return (1 << (self.state_bits - 1)) - 1

    @property
    def payload_max(self) -> int:
        """Largest graded-spike payload magnitude, 2**(input_payload_bits-1)."""
        return 1 << (self.input_payload_bits - 1)

    def message_bits(self, source_signed: bool | None) -> int:
        """Message bits of a synapse (Lava's ``num_message_bits``; 0 = binary spikes) by
        its source: ``None`` the input (graded payload), ``True`` a signed layer, ``False``
        an IF layer."""
        if source_signed is None:
            return self.input_payload_bits
        return self.signed_spike_bits if source_signed else 0

    @property
    def mantissa_min(self) -> int:
        """Smallest weight mantissa m with weight = weight_step * m (-128)."""
        return self.weight_min // self.weight_step

    @property
    def mantissa_max(self) -> int:
        """Largest weight mantissa (127)."""
        return self.weight_max // self.weight_step


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Add ``target`` to ``TARGETS`` (names are unique)."""
    if target.name in TARGETS:
        raise ValueError(f"target {target.name!r} registered twice")
    TARGETS[target.name] = target
    return target


def registered(factory: Callable[[], Target]) -> Callable[[], Target]:
    """Decorator: register the target a zero-argument factory returns."""
    register(factory())
    return factory


def get_target(name: str) -> Target:
    """The target called ``name``; InputError (exit 2) listing the valid names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        valid = ", ".join(sorted(TARGETS))
        raise InputError(f"unknown target {name!r}; valid targets: {valid}") from None
