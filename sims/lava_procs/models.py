"""Process models of ``IFBiasSchedule`` and ``SignedIFBiasSchedule``: ``fixed_pt`` (bit-exact,
integer-only) and ``floating_pt``.

The fixed-point models compute exactly ``sims.reference.run_layer`` inside the sample window
documented in ``sims.lava_procs.process``. Their arithmetic is integer adds, shifts, one
compare (the signed neuron: two compares and a count update) and one subtract per neuron and
step, so it maps to a Loihi 2 microcoded neuron program; the int64 intermediate only holds a
sum of three values that each fit 25 bits before the 24-bit saturation.

The IF models send 0/1 on a bool port (Lava's spike); the signed models send -1/0/+1 as int8
graded payloads (the synapses reading them run with num_message_bits > 0 and compute
``weights @ s``). The decorated models subclass undecorated bases (Lava refuses a model
that subclasses another Process's model), never the decorated LIF models (which Lava would
otherwise also match to LIF), and this file uses absolute imports only (Lava executes it
during model discovery).
"""
from __future__ import annotations

import numpy as np

from lava.magma.core.decorator import implements, requires, tag
from lava.magma.core.model.py.model import PyLoihiProcessModel
from lava.magma.core.model.py.ports import PyInPort, PyOutPort
from lava.magma.core.model.py.type import LavaPyType
from lava.magma.core.resources import CPU
from lava.magma.core.sync.protocols.loihi_protocol import LoihiProtocol

from sims.lava_procs.process import PACK_BITS, IFBiasSchedule, SignedIFBiasSchedule

_PACK_WEIGHTS = np.left_shift(np.int64(1), np.arange(PACK_BITS, dtype=np.int64))


def pack_spikes(s: np.ndarray, words: int) -> np.ndarray:
    """Bits of ``s`` (n,) -> ``words`` int64, bit j of word w is neuron 48*w + j."""
    bits = np.zeros(words * PACK_BITS, dtype=np.int64)
    bits[:s.size] = s
    return bits.reshape(words, PACK_BITS) @ _PACK_WEIGHTS


class AbstractIFBiasScheduleModel(PyLoihiProcessModel):
    """Sample windowing and recording shared by every model; ``integrate`` is the neuron
    (charge, clamp, ``fire``, reset); ``start_sample``, ``fire`` and ``record`` are the IF
    neuron's, which ``SignedNeuron`` overrides."""

    bias_exp: int = LavaPyType(int, np.int32, precision=5)
    act_shift: int = LavaPyType(int, np.int32, precision=5)
    state_bits: int = LavaPyType(int, np.int32, precision=6)
    depth: int = LavaPyType(int, np.int32, precision=16)
    timesteps: int = LavaPyType(int, np.int32, precision=16)
    period: int = LavaPyType(int, np.int32, precision=16)
    readout: int = LavaPyType(int, np.int32, precision=1)
    step: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=32)
    spike_rec: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=48)

    def run_spk(self) -> None:
        a_in = self.a_in.recv()          # always drain the port, even outside the window
        k = int(self.step[0])
        self.step[0] = k + 1
        tau, sample = k % self.period + 1, k // self.period
        if tau == 1:
            self.start_sample()
        t = tau - self.depth
        spikes = np.zeros(self.v.shape, dtype=bool)
        if 1 <= t <= self.timesteps:
            row = sample * self.timesteps + t - 1
            spikes = self.integrate(a_in, t)
            if self.readout:
                self.v_rec[row] = self.v
            else:
                self.record(row, spikes)
        self.s_out.send(spikes)

    def start_sample(self) -> None:
        """Local step 1 of a sample: ``v = v_init``."""
        self.v[:] = self.v_init

    def integrate(self, a_in: np.ndarray, t: int) -> np.ndarray:
        raise NotImplementedError

    def fire(self, v: np.ndarray) -> np.ndarray:
        """The IF compare on the clamped membrane: ``s = v >= vth`` (bool)."""
        return v >= self.vth

    def record(self, row: int, spikes: np.ndarray) -> None:
        """Step ``row``'s 0/1 spikes, packed into ``spike_rec``."""
        self.spike_rec[row] = pack_spikes(spikes, self.spike_rec.shape[1])

    def state_range(self) -> tuple[int, int]:
        """The saturating state's bounds, -2**(bits-1) .. 2**(bits-1) - 1 (the target's)."""
        top = 1 << (int(self.state_bits) - 1)
        return -top, top - 1


class SignedNeuron:
    """The signed neuron's part of a model (mixed in before an arithmetic base): a net spike
    count ``count`` reset with v, the compare of ``sims.reference``'s signed neuron, and the
    -1 spikes recorded in ``neg_rec``."""

    count: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    neg_rec: np.ndarray = LavaPyType(np.ndarray, np.int64, precision=48)

    def start_sample(self) -> None:
        """Local step 1 of a sample: ``v = v_init``, ``count = 0``."""
        self.v[:] = self.v_init
        self.count[:] = 0

    def fire(self, v: np.ndarray) -> np.ndarray:
        """``s = (v >= vth) - (v < 0 and count > 0)`` (int8 -1 / 0 / +1), then
        ``count += s``; the caller subtracts ``s * vth`` from v."""
        spikes = (v >= self.vth).astype(np.int8) - ((v < 0) & (self.count > 0))
        self.count[:] = self.count + spikes
        return spikes

    def record(self, row: int, spikes: np.ndarray) -> None:
        """Step ``row``'s +1 spikes packed into ``spike_rec``, its -1 spikes into ``neg_rec``."""
        words = self.spike_rec.shape[1]
        self.spike_rec[row] = pack_spikes(spikes > 0, words)
        self.neg_rec[row] = pack_spikes(spikes < 0, words)


class FixedArithmetic(AbstractIFBiasScheduleModel):
    """Bit-exact integer neuron (``sims.reference`` arithmetic); ``fire`` is the compare."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, np.int32, precision=24)
    v: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    vth: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    v_init: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    bias: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)
    v_rec: np.ndarray = LavaPyType(np.ndarray, np.int32, precision=24)

    def integrate(self, a_in: np.ndarray, t: int) -> np.ndarray:
        bias = self.bias[t - 1].astype(np.int64) << self.bias_exp
        v = self.v.astype(np.int64) + (a_in.astype(np.int64) << int(self.act_shift)) + bias
        v = np.clip(v, *self.state_range())
        spikes = np.zeros(v.shape, dtype=bool) if self.readout else self.fire(v)
        self.v[:] = v - spikes * self.vth.astype(np.int64)
        return spikes


class FloatArithmetic(AbstractIFBiasScheduleModel):
    """Float neuron: the same equation in float64 (exact while values stay below 2**53).

    Note Lava's floating-point Dense ignores ``weight_exp``; with weight_exp != 0 the float
    simulation is not expected to match the integer reference."""

    a_in: PyInPort = LavaPyType(PyInPort.VEC_DENSE, float)
    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, float)
    v: np.ndarray = LavaPyType(np.ndarray, float)
    vth: np.ndarray = LavaPyType(np.ndarray, float)
    v_init: np.ndarray = LavaPyType(np.ndarray, float)
    bias: np.ndarray = LavaPyType(np.ndarray, float)
    v_rec: np.ndarray = LavaPyType(np.ndarray, float)

    def integrate(self, a_in: np.ndarray, t: int) -> np.ndarray:
        bias = self.bias[t - 1] * float(2 ** self.bias_exp)
        v = np.clip(self.v + a_in * float(1 << int(self.act_shift)) + bias, *self.state_range())
        spikes = np.zeros(v.shape, dtype=bool) if self.readout else self.fire(v)
        self.v[:] = v - spikes * self.vth
        return spikes


@implements(proc=IFBiasSchedule, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PyIFBiasScheduleFixed(FixedArithmetic):
    """Bit-exact IF model; spikes 0/1 on a bool port."""

    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, bool, precision=1)


@implements(proc=SignedIFBiasSchedule, protocol=LoihiProtocol)
@requires(CPU)
@tag("fixed_pt")
class PySignedIFBiasScheduleFixed(SignedNeuron, FixedArithmetic):
    """Bit-exact signed model; spikes -1 / 0 / +1 as int8 graded payloads."""

    s_out: PyOutPort = LavaPyType(PyOutPort.VEC_DENSE, np.int8, precision=2)


@implements(proc=IFBiasSchedule, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PyIFBiasScheduleFloat(FloatArithmetic):
    """Float IF model (spikes 0.0 / 1.0)."""


@implements(proc=SignedIFBiasSchedule, protocol=LoihiProtocol)
@requires(CPU)
@tag("floating_pt")
class PySignedIFBiasScheduleFloat(SignedNeuron, FloatArithmetic):
    """Float signed model (spikes -1.0 / 0.0 / 1.0)."""
