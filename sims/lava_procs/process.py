"""``IFBiasSchedule``: integrate-and-fire neurons with a per-step bias schedule, for Lava.

The neuron arithmetic is ``sims.reference`` (the integer specification), run inside Lava's
timing: Lava's Dense/Conv/Sparse deliver at step k what was sent at step k-1, so a layer
``depth`` hops from the input sees its step-t input at local step ``tau = depth + t``
(``hw_targets.timing``; the synapses of residual inputs carry the synaptic delays that make
every input of the layer's step t arrive then).

Samples are run back to back, ``period = T + D`` steps each (D = deepest layer's depth), so
the last layer finishes its T steps inside the sample's window. Within a sample, at local
step tau = 1..period:

- tau == 1: ``v = v_init`` (a new sample starts from the calibrated initial membrane);
- depth < tau <= depth + T (the layer's window, t = tau - depth)::

      v = clamp(v + (a << 6) + (bias_mant[t-1] << bias_exp), -2**23, 2**23 - 1)
      s = v >= vth;  v -= s * vth          (spiking layers; the readout keeps v, never spikes)

  and for a signed layer (``signed=True``; ``sims.reference``'s signed neuron), whose net
  spike count n is also reset to 0 at tau == 1::

      s = (v >= vth) - (v < 0 and n > 0);  v -= s * vth;  n += s     (s in -1 / 0 / +1)

- outside the window: a_in is received and ignored (this also discards what the previous
  sample left in the synapses), v is held and nothing is sent.

All per-neuron arrays are flat in C order of the layer's (C, H, W) shape, the order of the
reference and the emulator; the runner reshapes ports for Lava's (W, H, C) Conv.

Records (one ``.get()`` each at the end, because Lava sends a Var to the host one element
at a time): ``spike_rec`` (N*T, words) holds each step's spikes packed 48 per int64 word
(exact in the float64 that ``.get()`` returns), a signed layer's +1 spikes only, and
``neg_rec`` (signed layers only, same layout) its -1 spikes; ``v_rec`` (N*T, n) the
readout's v.

A signed layer is its own Process class, ``SignedIFBiasSchedule`` (what
``IFBiasSchedule(..., signed=True)`` constructs): Lava picks a model by the Process's exact
class and fixes a port's message type per model, and the signed models send -1 on an int8
port where the IF models keep their bool port.
"""
from __future__ import annotations

import numpy as np

from lava.magma.core.process.ports.ports import InPort, OutPort
from lava.magma.core.process.process import AbstractProcess, LogConfig
from lava.magma.core.process.variable import Var

PACK_BITS = 48  # spikes per record word; < 53 so a word survives Lava's float64 .get()


def packed_words(n: int) -> int:
    """Words per step needed to pack ``n`` spikes."""
    return -(-n // PACK_BITS)


class IFBiasSchedule(AbstractProcess):
    """A population of ``n`` IF neurons (flat C order) with a time-indexed bias.

    Parameters: ``vth`` (n,) per-neuron threshold in state units, ``bias`` (T, n) effective-bias mantissas per
    neuron, ``bias_exp`` (int >= 0), ``v_init`` (n,), ``depth`` (hops from the input),
    ``act_shift`` and ``state_bits`` (the target's synaptic-input shift, 6, and state width,
    24: ``hw_targets``),
    ``timesteps`` T, ``period`` (steps per sample), ``num_samples`` (record size),
    ``readout`` (no spikes; record v instead), ``signed`` (the signed neuron: this call then
    builds a ``SignedIFBiasSchedule``; never with ``readout``).
    """

    def __new__(cls, *args, signed: bool = False, **kwargs):
        """``signed=True`` constructs the signed neuron's Process class (its own models)."""
        return super().__new__(SignedIFBiasSchedule if signed else cls)

    def __init__(self, *, n: int, vth: np.ndarray, bias: np.ndarray, bias_exp: int,
                 act_shift: int, state_bits: int,
                 v_init: np.ndarray, depth: int, timesteps: int, period: int,
                 num_samples: int, readout: bool = False, signed: bool = False,
                 name: str | None = None, log_config: LogConfig | None = None) -> None:
        if self.signed and readout:
            raise ValueError(f"layer {name}: a readout never spikes, so it cannot be signed "
                             "(build it with signed=False)")
        super().__init__(n=n, name=name, log_config=log_config)
        rows = num_samples * timesteps
        self.a_in = InPort(shape=(n,))
        self.s_out = OutPort(shape=(n,))
        self.v = Var(shape=(n,), init=np.asarray(v_init, dtype=np.int64))
        self.v_init = Var(shape=(n,), init=np.asarray(v_init, dtype=np.int64))
        self.vth = Var(shape=(n,), init=np.asarray(vth, dtype=np.int64))
        self.bias = Var(shape=(timesteps, n), init=np.asarray(bias, dtype=np.int64))
        self.bias_exp = Var(shape=(1,), init=int(bias_exp))
        self.act_shift = Var(shape=(1,), init=int(act_shift))
        self.state_bits = Var(shape=(1,), init=int(state_bits))
        self.depth = Var(shape=(1,), init=int(depth))
        self.timesteps = Var(shape=(1,), init=int(timesteps))
        self.period = Var(shape=(1,), init=int(period))
        self.readout = Var(shape=(1,), init=int(bool(readout)))
        self.step = Var(shape=(1,), init=0)
        self.spike_rec = Var(shape=(rows, 1 if readout else packed_words(n)), init=0)
        self.v_rec = Var(shape=(rows, n) if readout else (1, 1), init=0)
        if self.signed:
            self.count = Var(shape=(n,), init=0)
            self.neg_rec = Var(shape=(rows, packed_words(n)), init=0)

    @property
    def signed(self) -> bool:
        """Whether this population is the signed neuron (a ``SignedIFBiasSchedule``)."""
        return isinstance(self, SignedIFBiasSchedule)


class SignedIFBiasSchedule(IFBiasSchedule):
    """``IFBiasSchedule`` with the signed neuron: a net spike count ``count`` (n,) and -1
    spikes (sent as int8 graded payloads, recorded in ``neg_rec``). Build it through
    ``IFBiasSchedule(..., signed=True)`` or directly, with the same parameters."""
