"""Recognise QCFS activations (Bu et al., ICLR 2022) however a model spells them.

QCFS's public code writes its activation (``MyFloor``: learned threshold ``up``, ``t`` = L
levels, floor with a straight-through gradient) as::

    x = x / up;  x = floor(x * L + 0.5) / L;  x = clamp(x, 0, 1);  x * up

others clamp first (``clamp(x / up, 0, 1)``, then ``floor(x * L + 0.5) / L * up``), put a ReLU in
front, use a per-channel ``up`` or a constant. Every front end (torch.export, TorchScript,
ONNX's Div / Clip / Mul / Add / Floor) hands the tracer the same elementwise ops, so they are
matched here, on the ops, not on one spelling:

* the affine ops before the floor fold into the Conv/Linear as usual (``u`` below is that
  layer's output);
* ``floor`` starts a *chain*: the per-channel elementwise steps (positive affine maps and
  clamps) applied to ``u`` since the layer (a clamp before the floor, e.g. a clipped ReLU,
  starts the chain there; so does an affine op the tracer cannot fold, e.g. ``/ up`` after
  a residual sum). Every later affine/clamp op on the chain extends it;
* after each step the chain is reduced to ``y = c2 + s2 * clip(floor(s1 u + c1), A, B)``
  (positive affine maps and clamps compose into one clipped affine map, and floor commutes
  with a clamp). When the lowest level is 0 (``c2 + s2 A = 0``) that is exactly::

      y = QCFS(z; theta = s2 (B - A), L = B - A),   z = s2 s1 u + s2 (c1 - A - 1/2)

  so the layer is re-emitted with that affine map folded in and a ``QcfsNode`` follows it
  (after a residual sum the map must be the identity, as it is for QCFS written as above).
  A chain that never reaches this form (any other use of floor, a negative scale, a
  non-identity map after a residual sum) is an ``Unresolved`` value: if the output depends
  on it, it is reported with the other unsupported ops (a chain without a floor keeps the
  tracer's own refusal of its first op).

Importing this module registers its handlers, wrapping those of ``toolchain.builder``
(``toolchain.trace`` imports it before any front end runs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from core.ir import ConvNode, InputNode, LinearNode, QcfsNode, ReluNode
from toolchain.builder import (HANDLERS, Act, Builder, Op, Refuse, Unresolved, advice, handles,
                               per_channel, scalar)

FLOOR_WHY = ("is not part of a QCFS activation (theta/L * clip(floor(x L / theta + 1/2), 0, L) "
             "after a Conv2d/Linear), and floor has no integrate-and-fire equivalent otherwise")
FLOOR_FIX = ("use QCFS exactly (x / up, floor(x * L + 0.5) / L, clamp(0, 1), * up) right after "
             "a Conv2d/Linear (+ BatchNorm), or ReLU")
NOT_AFTER_LAYER = ("is a QCFS activation on a value that is not a Conv2d/Linear output (e.g. a "
                   "residual sum), which cannot absorb its input scale and shift",
                   "place the QCFS activation right after a Conv2d/Linear (+ BatchNorm)")
LEVEL_RTOL = 1e-6  # how close the lowest level must be to 0 (float32 constants)
IDENTITY_TOL = 1e-12  # float64 rounding of theta / L * L / theta: far below float32's


@dataclass(frozen=True)
class Chain:
    """Elementwise steps applied to the output of pending node ``source``: ("affine", s, c),
    ("clamp", lo, hi) or ("floor",), per-channel float64 arrays."""
    source: int
    steps: tuple
    refusal: Refuse | None = None  # the tracer's refusal of the chain's first op (no floor)


# =========================================================================== reduction

def _compose(ca: tuple, step: tuple) -> tuple:
    """A clipped affine map clip(s x + c, lo, hi) followed by an affine map or a clamp."""
    s, c, lo, hi = ca
    if step[0] == "affine":
        k, d = step[1], step[2]
        return s * k, c * k + d, lo * k + d, hi * k + d
    return s, c, np.maximum(lo, step[1]), np.minimum(hi, step[2])


def _clipped_affine(steps: tuple, channels: int) -> tuple:
    ca = (np.ones(channels), np.zeros(channels), np.full(channels, -np.inf),
          np.full(channels, np.inf))
    for step in steps:
        ca = _compose(ca, step)
    return ca


def reduce_chain(steps: tuple, channels: int) -> tuple | None:
    """(scale, shift, threshold, levels) with ``steps(u) = QCFS(scale u + shift)`` per
    channel, or None when the steps are not (yet) a QCFS activation (module docstring)."""
    floors = [i for i, st in enumerate(steps) if st[0] == "floor"]
    if len(floors) != 1:
        return None
    s1, c1, lo1, hi1 = _clipped_affine(steps[:floors[0]], channels)
    s2, c2, lo2, hi2 = _clipped_affine(steps[floors[0] + 1:], channels)
    if np.any(s1 <= 0) or np.any(s2 <= 0):
        return None
    with np.errstate(invalid="ignore"):
        low = np.maximum(np.floor(lo1), np.ceil((lo2 - c2) / s2 - LEVEL_RTOL))
        high = np.minimum(np.floor(hi1), np.floor((hi2 - c2) / s2 + LEVEL_RTOL))
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        return None
    levels = high - low
    if np.any(levels < 1) or np.any(levels != levels[0]):
        return None
    if np.any(np.abs(c2 + s2 * low) > LEVEL_RTOL * s2 * levels):
        return None
    return s2 * s1, s2 * (c1 - low - 0.5), s2 * levels, int(levels[0])


# =========================================================================== chains

def _channels(act: Act) -> int:
    return int(act.example.shape[1])


def _start(b: Builder, act: Act, refusal: Refuse | None = None) -> Chain | None:
    """The chain ``act`` ends: its own, or a new one on a layer's output (a ReLU's: from its
    input, with the ReLU's clamp); None on the model input (its transform is elsewhere).
    ``refusal``: what the tracer said about the op (reported if no QCFS comes of it)."""
    if act.key in b.chains:
        return b.chains[act.key]
    prod = b.producer(act)
    if prod is None or prod.cls is InputNode:
        return None
    if prod.cls is ReluNode:
        n, clip = _channels(act), prod.fields.get("clip")
        step = ("clamp", np.zeros(n), np.full(n, np.inf if clip is None else clip))
        return Chain(prod.inputs[0], (step,), refusal)
    return Chain(act.key, (), refusal)


def _extend(b: Builder, op: Op, act: Act, chain: Chain, step: tuple) -> Act:
    """Append ``step``; emit the QCFS activation when the chain is one, else an Unresolved
    value whose problem is reported if the output depends on it."""
    chain = replace(chain, steps=chain.steps + (step,))
    reduced = reduce_chain(chain.steps, _channels(act))
    src = Act(chain.source, act.example)
    out = None if reduced is None else _emit_qcfs(b, op, src, *reduced)
    if out is None:
        why, fix = _unresolved_reason(chain, reduced)
        out = b.emit(op, Unresolved, [src], problem=f"{op.describe()}: {op.label} {why}; {fix}")
    b.chains[out.key] = chain
    return out


def _unresolved_reason(chain: Chain, reduced: tuple | None) -> tuple[str, str]:
    if not any(st[0] == "floor" for st in chain.steps):
        return ((chain.refusal.why, chain.refusal.fix) if chain.refusal is not None
                else advice("mul"))
    if reduced is not None:
        return NOT_AFTER_LAYER
    return FLOOR_WHY, FLOOR_FIX


def _emit_qcfs(b: Builder, op: Op, src: Act, scale: np.ndarray, shift: np.ndarray,
               threshold: np.ndarray, levels: int) -> Act | None:
    """The source with ``scale * u + shift`` folded in, then a QcfsNode; None when the
    source is not a Conv/Linear to fold it into (and the map is not the identity)."""
    prod = b.producer(src)
    if np.all(np.abs(scale - 1) <= IDENTITY_TOL) and np.all(np.abs(shift) <= IDENTITY_TOL *
                                                             threshold):
        pre = src  # e.g. QCFS after a residual sum: (x / theta * L + 1/2 - 1/2) * theta / L
    elif prod.cls in (ConvNode, LinearNode):
        w = prod.fields["weight"]
        pre = b.refold(op, src, weight=w * scale.reshape((-1,) + (1,) * (w.ndim - 1)),
                       bias=prod.fields["bias"] * scale + shift)
    else:
        return None
    return b.emit(op, QcfsNode, [pre], threshold=np.asarray(threshold, np.float64),
                  levels=levels)


# =========================================================================== handlers

@handles("aten::floor")
def _floor(b: Builder, op: Op) -> Act:
    """floor: the start (or the middle) of a QCFS activation; nothing else."""
    x = op.args[0]
    chain = _start(b, x) if isinstance(x, Act) else None
    if chain is None:
        raise Refuse(FLOOR_WHY, FLOOR_FIX)
    return _extend(b, op, x, chain, ("floor",))


@handles("onnx::Floor")
def _onnx_floor(b: Builder, op: Op) -> Act:
    return _floor(b, replace(op, kind="aten::floor"))


def _affine_step(op: Op, act: Act) -> tuple:
    """The op as ("affine", scale, shift) on ``act`` (the other operand a constant)."""
    x, y = op.args[0], op.args[1]
    other = y if x is act else x
    extra = op.args[2] if len(op.args) > 2 else None
    if isinstance(other, Act) or (op.kind == "aten::div" and (y is act or extra)):
        raise Refuse(*advice(op.label))
    const = per_channel(other, act, "constant")
    one, zero = np.ones_like(const), np.zeros_like(const)
    alpha = 1.0 if op.kind in ("aten::mul", "aten::div") or extra is None else scalar(extra)
    if op.kind == "aten::mul":
        return ("affine", const, zero)
    if op.kind == "aten::div":
        return ("affine", 1.0 / const, zero)
    if op.kind == "aten::add":
        return ("affine", one * alpha, const) if y is act else ("affine", one, alpha * const)
    # sub: x - alpha y;  rsub: y - alpha x
    act_first = (x is act) == (op.kind == "aten::sub")
    return ("affine", one, -alpha * const) if act_first else ("affine", -alpha * one, const)


_CLAMP_BOUNDS = {
    "aten::relu": lambda a: (0.0, None), "aten::relu6": lambda a: (0.0, 6.0),
    "aten::clamp_min": lambda a: (a[1], None), "aten::clamp_max": lambda a: (None, a[1]),
    "aten::clamp": lambda a: (a[1], a[2]), "aten::hardtanh": lambda a: (a[1], a[2])}


def _clamp_step(op: Op, act: Act) -> tuple:
    lo, hi = (scalar(v) for v in _CLAMP_BOUNDS[op.kind](op.args))
    n = _channels(act)
    return ("clamp", np.full(n, -np.inf if lo is None else lo),
            np.full(n, np.inf if hi is None else hi))


def _chained(kind: str, step_of: Callable[[Op, Act], tuple]) -> None:
    """Wrap the tracer's handler of ``kind``: the op on a chain, or one the tracer refuses
    (a scale after a ReLU or a residual sum), extends a chain; anything else is the
    tracer's."""
    base = HANDLERS[kind]

    def handler(b: Builder, op: Op) -> Any:
        act = next((a for a in op.args[:2] if isinstance(a, Act)), None)
        if act is not None and act.key in b.chains:
            return _extend(b, op, act, b.chains[act.key], step_of(op, act))
        try:
            return base(b, op)
        except Refuse as err:
            chain = _start(b, act, err) if act is not None else None
            if chain is None:
                raise
            try:
                step = step_of(op, act)
            except Refuse:
                raise err from None  # not elementwise either: the tracer's reason stands
            return _extend(b, op, act, chain, step)
    handler.__doc__ = base.__doc__
    HANDLERS[kind] = handler


for _kind in ("aten::mul", "aten::div", "aten::add", "aten::sub", "aten::rsub"):
    _chained(_kind, _affine_step)
for _kind in _CLAMP_BOUNDS:
    _chained(_kind, _clamp_step)
