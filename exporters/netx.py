"""QuantGraph <-> lava-dl netx HDF5 file, with an exact ``ftbc/`` extension group.

One file carries two views of the same network:

``layer/<i>``, ``simulation/``  (lava-dl netx's schema; ``netx.hdf5.Network`` opens it)
    What netx can say about the network, for the longest prefix of layers that is a plain
    chain (one synapse per layer, fed by the layer before). netx conventions, each checked by a
    round trip through ``lava.lib.dl.netx.hdf5.Network``:

    - ``shape`` is stored (C, H, W) (a flat layer as (F, 1, 1)); netx works in (W, H, C).
    - conv ``weight`` is stored (out, in/groups, kH, kW), i.e. torch's layout, exactly our
      ``QSynapse.weight``; netx flips both kernel axes and transposes it to Lava's
      (out, kW, kH, in) because Lava's Conv convolves (torch correlates).
    - ``stride``/``padding``/``dilation`` are stored (H, W); netx reverses them to (X, Y).
    - dense ``weight`` is (out, in) over the source flattened in C order; a ``flatten`` entry
      precedes a dense layer fed by a conv layer (netx flattens (W, H, C) -> C order).
    - netx reads ``weight`` as the effective integer weight and derives weight_exp itself.
    - neuron: CUBA with ``iDecay`` stored +1 (netx sets du = iDecay - 1): iDecay = 4096 gives
      du = 4095 which, with Loihi's 1-bit ds_offset, is a full current decay, so the current
      is just this step's synaptic input (our neuron has no current state); ``vDecay`` = 0
      (no leak); ``vThMant`` = vth >> 6 (Loihi compares v to vThMant << 6); ``bias`` is a
      constant mantissa with bias_exp fixed at 6 by netx.

    What netx cannot say, and so is only approximated there: our compare is ``v >= vth``
    (Lava's LIF uses ``>``), our reset subtracts vth (LIF resets to 0), our bias changes with
    t (netx gets the per-channel time average, rounded, clipped to a 13-bit mantissa), v
    starts at v_init (LIF at 0), the readout never spikes (netx gets the largest threshold,
    like lava-dl's own exports), and layers with several input synapses (residual sums), a
    source other than the previous layer, or the signed neuron (``QLayer.signed``: -1
    spikes, a net spike count; netx's neurons have neither) end the netx view.

``ftbc/``  (ignored by netx; the only thing ``read_netx`` builds the QuantGraph from)
    Everything exact: neuron kind, vth, bias schedules (T, C) + exponent, v_init, depth,
    readout flag, signed flag (stored only on signed layers, so files of IF-only networks
    are unchanged; a file with a signed layer says so in ``neuron/kind``, which readers that
    implement only the IF neuron refuse), every synapse with its source and its synaptic
    delay, the input encoding, target, timesteps and provenance (``QuantGraph.meta`` as
    JSON, numpy arrays tagged with dtype and shape). ``depth`` is the layer's hops from the
    input (its step offset on the chip); a synapse's ``delay`` is the extra steps it holds
    its spikes so that a residual layer's inputs arrive together (Loihi 2's 6-bit synaptic
    delay field, 0..63; ``hw_targets.timing``): 0 on every path but the shorter ones into a
    residual sum. The reader checks both against the graph (``validate_graph``); layout:
    docs/netx.md. Synapse weights are stored once: the netx ``weight`` of a chain layer is a
    hard link to the exact weight when the two coincide (weight_exp == 0).

Files are byte-for-byte deterministic (no HDF5 object timestamps, fixed library version
bounds, creation-ordered groups) and written atomically (temporary file + ``os.replace``).
This module must not import torch or ``sims``.
"""
from __future__ import annotations

import json
import io
import os
import secrets
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from core.errors import InputError
from core.ir import INPUT, QInput, QLayer, QSynapse, QuantGraph, SynapseKind
from hw_targets import Target, get_target
from hw_targets.timing import synaptic_delays

FORMAT = "ftbc-netx"
VERSION = 2   # 2: layers store "depth" (v1 called it "delay"), synapses "delay"
# Widths, shifts and ranges come from the graph's target (hw_targets); this is the Loihi 2
# targets' graded-input payload, kept for readers of this module's old constant.
PAYLOAD_BITS = get_target("loihi2").input_payload_bits
NETX_BIAS_EXP = 6         # netx fixes CUBA bias_exp at 6
NETX_VTH_SHIFT = 6        # Loihi compares v with vThMant << 6
NETX_READOUT_VTH = (1 << 17) - 1   # largest threshold mantissa: a non-spiking integrator
BIAS_MANT_LIMIT = 1 << 12          # netx/Loihi bias mantissa: 13-bit signed
NEURON_IF = "integrate-and-fire"
NEURON_SIGNED = "integrate-and-fire+signed"  # some layers are signed (layers/<i>/signed)
_LIBVER = ("earliest", "v110")


# =========================================================================== writing

def write_netx(q: QuantGraph, path: str | os.PathLike) -> None:
    """Write ``q`` to ``path`` (netx view + exact ``ftbc/`` group), atomically.

    Refuses (``InputError``) a graph that ``validate_graph`` rejects, so every file written
    here can be read back."""
    problems = validate_graph(q)
    if problems:
        raise InputError(f"cannot export: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    path = Path(path)
    # The HDF5 image is built in memory and written by Python: a full or failing disk is
    # then one OSError (errno ENOSPC, EFBIG, ...), where HDF5 writing the file itself
    # reports it as RuntimeErrors from its objects' destructors and may crash on them.
    image = io.BytesIO()
    with h5py.File(image, "w", libver=_LIBVER, track_order=True) as f:
        _write_file(f, q)
    # Created here ("x": fail if it exists) with the usual umask permissions (mkstemp's
    # would be 0600), beside the target, on the same file system.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as out:
            out.write(image.getbuffer())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_file(f: h5py.File, q: QuantGraph) -> None:
    """ftbc/ first (it owns the weight datasets), then the netx view linking to them."""
    root = _group(f, "ftbc")
    _put(root, "format", FORMAT)
    _put(root, "version", VERSION)
    _put(root, "target", q.target)
    _put(root, "timesteps", q.timesteps)
    target = get_target(q.target)
    _put(root, "payload_bits", target.input_payload_bits)
    _put(root, "meta", meta_to_json(q.meta))
    neuron = _group(root, "neuron")
    for key, value in neuron_record(target, any(layer.signed for layer in q.layers)).items():
        _put(neuron, key, value)
    _write_input(_group(root, "input"), q.input)
    layers, delays = _group(root, "layers"), synaptic_delays(q.layers)
    for i, layer in enumerate(q.layers):
        _write_layer(_group(layers, str(i)), layer, delays[layer.name])
    chain = netx_chain(q)
    _put(root, "netx_layers", len(chain))
    _write_netx_view(f, q, chain, layers)


def _group(parent: h5py.Group, name: str) -> h5py.Group:
    return parent.create_group(name, track_order=True)


def _put(group: h5py.Group, name: str, value: Any) -> h5py.Dataset:
    """One dataset, no timestamp. Strings become fixed-length UTF-8 bytes; Python ints int64;
    floats float64; arrays keep their dtype (so a round trip restores it exactly)."""
    if isinstance(value, str):
        data = np.bytes_(value.encode("utf-8"))
    elif isinstance(value, (bool, np.bool_)):
        data = np.uint8(bool(value))
    elif isinstance(value, (int, np.integer)):
        data = np.int64(value)
    elif isinstance(value, (float, np.floating)):
        data = np.float64(value)
    else:
        data = np.ascontiguousarray(value)
    return group.create_dataset(name, data=data, track_times=False)


def _write_input(g: h5py.Group, qin: QInput) -> None:
    _put(g, "shape", np.asarray(qin.shape, dtype=np.int64))
    _put(g, "scale_exp", qin.scale_exp)
    if qin.mean is not None:
        _put(g, "mean", qin.mean)
    if qin.std is not None:
        _put(g, "std", qin.std)


def _write_layer(g: h5py.Group, layer: QLayer, delays: tuple[int, ...]) -> None:
    _put(g, "name", layer.name)
    _put(g, "origin", layer.origin)
    _put(g, "shape", np.asarray(layer.shape, dtype=np.int64))
    _put(g, "vth", np.asarray(layer.vth, dtype=np.int64))
    _put(g, "bias_mant", layer.bias_mant)
    _put(g, "bias_exp", int(layer.bias_exp))
    _put(g, "v_init", layer.v_init)
    _put(g, "depth", int(layer.depth))
    _put(g, "scale", np.asarray(layer.scale, dtype=np.float64))
    _put(g, "readout", bool(layer.readout))
    if layer.signed:              # absent means IF: IF-only files stay byte-identical
        _put(g, "signed", True)
    syns = _group(g, "synapses")
    for k, syn in enumerate(layer.synapses):
        s = _group(syns, str(k))
        _put(s, "source", syn.source)
        _put(s, "kind", syn.kind)
        _put(s, "weight", syn.weight)
        _put(s, "weight_exp", int(syn.weight_exp))
        for key in ("stride", "padding", "dilation"):
            _put(s, key, np.asarray(getattr(syn, key), dtype=np.int64))
        _put(s, "groups", int(syn.groups))
        _put(s, "delay", int(delays[k]))


# --------------------------------------------------------------------------- netx view

def netx_chain(q: QuantGraph) -> list[QLayer]:
    """The longest prefix of ``q.layers`` netx can express: each layer has one conv or dense
    synapse whose source is the previous layer (the input for the first), conv only on a
    (C, H, W) source, and is not signed (netx's neurons cannot send -1)."""
    chain: list[QLayer] = []
    prev, prev_shape = INPUT, tuple(q.input.shape)
    for layer in q.layers:
        if len(layer.synapses) != 1 or layer.signed:
            break
        syn = layer.synapses[0]
        if syn.source != prev or (syn.kind is SynapseKind.CONV and len(prev_shape) != 3):
            break
        chain.append(layer)
        prev, prev_shape = layer.name, tuple(layer.shape)
    return chain


def _chw(shape: tuple[int, ...]) -> np.ndarray:
    """netx stores shapes as (C, H, W); a flat (F,) layer as (F, 1, 1)."""
    return np.asarray(tuple(shape) + (1,) * (3 - len(shape)), dtype=np.int64)


def _write_netx_view(f: h5py.File, q: QuantGraph, chain: list[QLayer],
                     exact: h5py.Group) -> None:
    top = _group(f, "layer")
    entry = _group(top, "0")
    _put(entry, "type", np.array([b"input"], dtype="S10"))
    _put(entry, "shape", _chw(q.input.shape))
    index, prev_shape = 1, tuple(q.input.shape)
    for i, layer in enumerate(chain):
        syn = layer.synapses[0]
        if syn.kind is SynapseKind.DENSE and len(prev_shape) == 3:
            flat = _group(top, str(index))
            _put(flat, "type", np.array([b"flatten"], dtype="S10"))
            _put(flat, "shape", _chw((int(np.prod(prev_shape)),)))
            index += 1
        exact_weight = exact[f"{i}/synapses/0/weight"]
        _write_netx_layer(_group(top, str(index)), layer, prev_shape, exact_weight)
        index, prev_shape = index + 1, tuple(layer.shape)
    sim = _group(f, "simulation")
    _put(sim, "Ts", 1)
    _put(sim, "tSample", q.timesteps + max((lay.depth for lay in q.layers), default=0))


def _write_netx_layer(g: h5py.Group, layer: QLayer, src_shape: tuple[int, ...],
                      exact_weight: h5py.Dataset) -> None:
    syn = layer.synapses[0]
    _put(g, "type", np.array([syn.kind.encode()], dtype="S10"))
    _put(g, "shape", _chw(layer.shape))
    if syn.weight_exp == 0:
        g["weight"] = exact_weight               # hard link: stored once
    else:
        _put(g, "weight", netx_weight(syn))
    _put(g, "bias", netx_bias(layer))
    if syn.kind is SynapseKind.CONV:
        _put(g, "inChannels", int(src_shape[0]))
        _put(g, "outChannels", int(layer.shape[0]))
        _put(g, "kernelSize", np.asarray(syn.weight.shape[2:], dtype=np.int64))
        for key in ("stride", "padding", "dilation"):
            _put(g, key, np.asarray(getattr(syn, key), dtype=np.int64))
        _put(g, "groups", int(syn.groups))
    else:
        _put(g, "inFeatures", int(np.prod(src_shape)))
        _put(g, "outFeatures", int(np.prod(layer.shape)))
    _write_netx_neuron(_group(g, "neuron"), layer)


def netx_weight(syn: QSynapse) -> np.ndarray:
    """The effective integer weight netx should see: ``w * 2**weight_exp`` (floored for a
    negative exponent, which netx cannot express exactly; exact values live in ftbc/)."""
    w = syn.weight.astype(np.int64)
    return w << syn.weight_exp if syn.weight_exp >= 0 else w >> -syn.weight_exp


def netx_bias(layer: QLayer) -> np.ndarray:
    """Per-channel constant bias mantissa for netx (bias_exp 6): the time average of our
    schedule's effective bias, rounded, clipped to the 13-bit mantissa (approximate)."""
    effective = layer.bias_mant.astype(np.int64) << layer.bias_exp
    mant = np.rint(effective.mean(axis=0) / (1 << NETX_BIAS_EXP)).astype(np.int64)
    return np.clip(mant, -BIAS_MANT_LIMIT, BIAS_MANT_LIMIT - 1).astype(np.int32)


def _write_netx_neuron(g: h5py.Group, layer: QLayer) -> None:
    _put(g, "type", "CUBA")
    _put(g, "iDecay", 4096)
    _put(g, "vDecay", 0)
    # netx holds one threshold per layer: the per-channel thresholds' median (approximate)
    vth = (NETX_READOUT_VTH if layer.readout
           else max(1, int(np.median(layer.vth)) >> NETX_VTH_SHIFT))
    _put(g, "vThMant", vth)
    _put(g, "refDelay", 1)
    _put(g, "wgtExp", 0)


# --------------------------------------------------------------------------- meta as JSON

def meta_to_json(meta: Mapping[str, Any]) -> str:
    """Provenance as JSON; numpy arrays are tagged with dtype and shape so they come back
    identical, numpy scalars become Python numbers, tuples become lists."""
    return json.dumps(_encode(meta, "meta"), separators=(",", ":"))


def meta_from_json(text: str) -> dict[str, Any]:
    return json.loads(text, object_hook=_decode_hook)


def _encode(obj: Any, where: str) -> Any:
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise InputError(f"{where}: meta keys must be strings, got {bad[0]!r}")
        return {k: _encode(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise InputError(f"{where}: cannot store {type(obj).__name__} in provenance meta")


def _decode_hook(obj: dict[str, Any]) -> Any:
    if "__ndarray__" in obj:
        arr = np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
        return arr.reshape(obj["shape"])
    return obj


# =========================================================================== reading

def read_netx(path: str | os.PathLike) -> QuantGraph:
    """Load the exact QuantGraph from ``ftbc/``; validate everything first.

    Raises a one-line ``InputError`` naming the problem for a missing, truncated or
    inconsistent file."""
    path = str(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({_one_line(exc)})") from None
    try:
        with f:
            q, delays = _read_graph(f)
            problems = validate_graph(q)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise InputError(problems[0] + more)
            _check_delays(q, delays)
            _check_netx_view(f, q, _int(f["ftbc"], "netx_layers"))
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    except _CORRUPT as exc:
        raise InputError(f"{path}: corrupt file ({_one_line(exc)})") from None
    return q


# What h5py/numpy/json raise on a damaged file: h5py reports bad metadata checksums as
# RuntimeError, a damaged structure as KeyError/OSError/ValueError/TypeError.
_CORRUPT = (KeyError, OSError, ValueError, TypeError, RuntimeError, IndexError,
            json.JSONDecodeError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_graph(f: h5py.File) -> tuple[QuantGraph, dict[str, tuple[int, ...]]]:
    """The graph and, per layer, its synapses' stored delays (checked by ``_check_delays``
    once the graph is known to be sound)."""
    root = _need_group(f, "ftbc")
    fmt, version = _str(root, "format"), _int(root, "version")
    if fmt != FORMAT or version != VERSION:
        raise InputError(f"ftbc/format is {fmt!r} v{version}, expected {FORMAT!r} v{VERSION}")
    target = get_target(_str(root, "target"))
    neuron = _need_group(root, "neuron")
    _check_neuron(neuron, target)
    if _int(root, "payload_bits") != target.input_payload_bits:
        raise InputError(f"ftbc/payload_bits must be {target.input_payload_bits}")
    layers_g = _need_group(root, "layers")
    read = [_read_layer(_need_group(layers_g, str(i)), f"ftbc/layers/{i}")
            for i in range(len(layers_g))]
    layers = tuple(layer for layer, _ in read)
    _check_neuron_kind(neuron, layers)
    q = QuantGraph(input=_read_input(_need_group(root, "input")), layers=layers,
                   timesteps=_int(root, "timesteps"), target=_str(root, "target"),
                   meta=meta_from_json(_str(root, "meta")))
    return q, {layer.name: delays for layer, delays in read}


def _check_delays(q: QuantGraph, stored: Mapping[str, tuple[int, ...]]) -> None:
    """Every synapse's stored delay must be the one the graph's depths give
    (``hw_targets.timing``): a file whose delays disagree would run misaligned."""
    for i, (name, want) in enumerate(synaptic_delays(q.layers).items()):
        for k, (got, need) in enumerate(zip(stored[name], want)):
            if got != need:
                raise InputError(f"ftbc/layers/{i}/synapses/{k}/delay is {got}, but layer "
                                 f"{name}'s sources need {need} (hw_targets.timing)")


def neuron_record(target: Target, signed: bool = False) -> dict:
    """The neuron the file promises (``sims.reference``), widths and shift from the target.
    ``kind`` is ``NEURON_SIGNED`` when some layer is signed (the IF neuron plus the signed
    one, which also sends -1: a reader that implements only the IF neuron refuses the
    file), ``NEURON_IF`` otherwise."""
    return {"kind": NEURON_SIGNED if signed else NEURON_IF, "reset": "subtract",
            "compare": ">=",
            "input_shift": target.act_shift,  # (the file's key)
            "state_bits": target.state_bits}


def _check_neuron(g: h5py.Group, target: Target) -> None:
    """Every ``neuron/`` key must be this toolchain's, ``kind`` one of the two neuron kinds it
    implements (``_check_neuron_kind`` then matches the kind to the layers)."""
    for key, want in neuron_record(target).items():
        got = _str(g, key) if isinstance(want, str) else _int(g, key)
        if key == "kind" and got not in (NEURON_IF, NEURON_SIGNED):
            raise InputError(f"ftbc/neuron/kind is {got!r}; this toolchain implements "
                             f"{NEURON_IF!r} and {NEURON_SIGNED!r}")
        if key != "kind" and got != want:
            raise InputError(f"ftbc/neuron/{key} is {got!r}; this toolchain implements {want!r}")


def _check_neuron_kind(g: h5py.Group, layers: tuple[QLayer, ...]) -> None:
    """``neuron/kind`` names the signed neuron exactly when some layer is signed."""
    signed = [i for i, layer in enumerate(layers) if layer.signed]
    kind, want = _str(g, "kind"), NEURON_SIGNED if signed else NEURON_IF
    if kind != want:
        which = (f"layers/{signed[0]}/signed is 1" if signed
                 else "no layers/<i>/signed is 1")
        raise InputError(f"ftbc/neuron/kind is {kind!r} but {which}: the file's neuron "
                         f"kind must be {want!r} (re-export the network)")


def _read_input(g: h5py.Group) -> QInput:
    return QInput(shape=_shape(g, "shape"), scale_exp=_int(g, "scale_exp"),
                  mean=_float_array(g, "mean") if "mean" in g else None,
                  std=_float_array(g, "std") if "std" in g else None)


def _read_layer(g: h5py.Group, where: str) -> tuple[QLayer, tuple[int, ...]]:
    syns = _need_group(g, "synapses")
    groups = [_need_group(syns, str(k)) for k in range(len(syns))]
    synapses = tuple(_read_synapse(s, f"{where}/synapses/{k}") for k, s in enumerate(groups))
    delays = tuple(_int(s, "delay") for s in groups)
    return QLayer(name=_str(g, "name"), shape=_shape(g, "shape"), synapses=synapses,
                  vth=_int_array(g, "vth", 1), bias_mant=_int_array(g, "bias_mant", 2),
                  bias_exp=_int(g, "bias_exp"), v_init=_int_array(g, "v_init", 1),
                  depth=_int(g, "depth"), scale=_float_array(g, "scale"),
                  readout=bool(_int(g, "readout")), origin=_str(g, "origin"),
                  signed=bool(_int(g, "signed")) if "signed" in g else False), delays


def _read_synapse(g: h5py.Group, where: str) -> QSynapse:
    kind = _str(g, "kind")
    if kind not in ("conv", "dense"):
        raise InputError(f"{where}/kind is {kind!r}, expected 'conv' or 'dense'")
    return QSynapse(source=_str(g, "source"), kind=kind,
                    weight=_int_array(g, "weight", 4 if kind == "conv" else 2),
                    weight_exp=_int(g, "weight_exp"), stride=_pair(g, "stride"),
                    padding=_pair(g, "padding"), dilation=_pair(g, "dilation"),
                    groups=_int(g, "groups"))


def _check_netx_view(f: h5py.File, q: QuantGraph, count: int) -> None:
    """The netx view must describe the same chain as ftbc/ (types and shapes)."""
    chain = netx_chain(q)
    if count != len(chain):
        raise InputError(f"ftbc/netx_layers is {count}, the graph has a chain of {len(chain)}")
    top = _need_group(f, "layer")
    want = [("input", _chw(q.input.shape))]
    prev = tuple(q.input.shape)
    for layer in chain:
        if layer.synapses[0].kind is SynapseKind.DENSE and len(prev) == 3:
            want.append(("flatten", _chw((int(np.prod(prev)),))))
        want.append((layer.synapses[0].kind, _chw(layer.shape)))
        prev = tuple(layer.shape)
    if len(top) != len(want):
        raise InputError(f"netx view has {len(top)} layers, ftbc/ implies {len(want)}")
    for i, (kind, shape) in enumerate(want):
        entry = _need_group(top, str(i))
        got = _need(entry, "type")[()]
        got = got[0] if np.ndim(got) == 1 and len(got) == 1 else got
        if not isinstance(got, bytes):
            raise InputError(f"netx view layer/{i}/type must be a string")
        got = got.decode("ascii")
        if got != kind or not np.array_equal(_need(entry, "shape")[()], shape):
            raise InputError(f"netx view layer/{i} ({got}) disagrees with ftbc/ ({kind})")


# --------------------------------------------------------------------------- typed getters

def _need(g: h5py.Group, key: str) -> h5py.Dataset:
    if key not in g:
        raise InputError(f"missing {g.name.rstrip('/')}/{key}")
    obj = g[key]
    if not isinstance(obj, h5py.Dataset):
        raise InputError(f"{obj.name} is not a dataset")
    return obj


def _need_group(g: h5py.Group, key: str) -> h5py.Group:
    if key not in g or not isinstance(g[key], h5py.Group):
        raise InputError(f"missing group {g.name.rstrip('/')}/{key}")
    return g[key]


def _str(g: h5py.Group, key: str) -> str:
    value = _need(g, key)[()]
    if not isinstance(value, bytes):
        raise InputError(f"{g.name}/{key} must be a string")
    return value.decode("utf-8")


def _int(g: h5py.Group, key: str) -> int:
    ds = _need(g, key)
    if ds.shape != () or ds.dtype.kind not in "iu":
        raise InputError(f"{ds.name} must be an integer scalar, got {ds.dtype} {ds.shape}")
    return int(ds[()])


def _float(g: h5py.Group, key: str) -> float:
    ds = _need(g, key)
    if ds.shape != () or ds.dtype.kind != "f":
        raise InputError(f"{ds.name} must be a float scalar, got {ds.dtype} {ds.shape}")
    return float(ds[()])


def _array(g: h5py.Group, key: str, kinds: str, ndim: int) -> np.ndarray:
    ds = _need(g, key)
    if ds.dtype.kind not in kinds or ds.ndim != ndim:
        raise InputError(f"{ds.name} must be a {ndim}-d {'integer' if 'i' in kinds else 'float'}"
                         f" array, got {ds.dtype} with shape {ds.shape}")
    arr = np.array(ds[()], copy=True)
    arr.setflags(write=False)
    return arr


def _int_array(g: h5py.Group, key: str, ndim: int) -> np.ndarray:
    return _array(g, key, "iu", ndim)


def _float_array(g: h5py.Group, key: str) -> np.ndarray:
    return _array(g, key, "f", 1)


def _shape(g: h5py.Group, key: str) -> tuple[int, ...]:
    return tuple(int(v) for v in _int_array(g, key, 1))


def _pair(g: h5py.Group, key: str) -> tuple[int, int]:
    values = _shape(g, key)
    if len(values) != 2:
        raise InputError(f"{g.name}/{key} must hold 2 integers, got {len(values)}")
    return values[0], values[1]


# =========================================================================== validation

def validate_graph(q: QuantGraph) -> list[str]:
    """Every problem of ``q``, one line each: first its structure (shapes, sources, names:
    what makes it a graph this file can hold), then, once that is sound, every violation of
    its target's limits from ``exporters.quantize.validate``, the one check of widths,
    ranges, depths and synaptic delays that the pipeline, this exporter and the Lava runner
    all consult."""
    from exporters.quantize import validate
    target = get_target(q.target)
    problems = _check_input(q.input)
    if not target.quantized:
        problems.append(f"target {q.target!r} is not a quantized hardware target")
    if q.timesteps < 1:
        problems.append(f"timesteps is {q.timesteps}, must be >= 1")
    shapes: dict[str, tuple[int, ...]] = {INPUT: tuple(q.input.shape)}
    for layer in q.layers:
        if layer.name in shapes:
            problems.append(f"layer name {layer.name!r} is used twice (or is 'input')")
        problems += [f"layer {layer.name}: {p}" for p in _check_layer(layer, q.timesteps)]
        for k, syn in enumerate(layer.synapses):
            problems += [f"layer {layer.name} synapse {k}: {p}"
                         for p in _check_synapse(syn, shapes, tuple(layer.shape))]
        shapes[layer.name] = tuple(layer.shape)
    if not q.layers:
        problems.append("the graph has no layers")
    return problems or [str(v) for v in validate(q, target)]


def _check_input(qin: QInput) -> list[str]:
    problems = []
    if len(qin.shape) not in (1, 3) or min(qin.shape, default=0) < 1:
        problems.append(f"input shape {qin.shape} must be (C, H, W) or (F,), all >= 1")
    if (qin.mean is None) != (qin.std is None):
        problems.append("input mean and std must both be present or both absent")
    for name, arr in (("mean", qin.mean), ("std", qin.std)):
        if arr is not None and qin.shape and arr.shape != (qin.shape[0],):
            problems.append(f"input {name} has shape {arr.shape}, expected ({qin.shape[0]},)")
    if qin.std is not None and np.any(qin.std == 0):
        problems.append("input std has a zero")
    return problems


def _check_layer(layer: QLayer, steps: int) -> list[str]:
    """Shapes of the layer's arrays (their values are the target's: ``validate``)."""
    problems = []
    if len(layer.shape) not in (1, 3) or min(layer.shape, default=0) < 1:
        return [f"shape {layer.shape} must be (C, H, W) or (F,), all >= 1"]
    chans = layer.shape[0]
    if layer.bias_mant.shape != (steps, chans):
        problems.append(f"bias_mant has shape {layer.bias_mant.shape}, expected ({steps}, {chans})")
    if layer.v_init.shape != (chans,):
        problems.append(f"v_init has shape {layer.v_init.shape}, expected ({chans},)")
    if layer.vth.shape != (chans,):
        problems.append(f"vth has shape {layer.vth.shape}, expected ({chans},)")
    if np.shape(layer.scale) != (chans,) or not np.all(np.isfinite(layer.scale)):
        problems.append("scale is not finite")
    if not layer.synapses:
        problems.append("has no input synapse")
    if layer.readout and layer.signed:
        problems.append("is a signed readout: a readout never spikes (make it signed=False)")
    return problems


def _check_synapse(syn: QSynapse, shapes: Mapping[str, tuple[int, ...]],
                   out_shape: tuple[int, ...]) -> list[str]:
    """Source and weight geometry (the weights' values are the target's: ``validate``)."""
    if syn.source not in shapes:
        return [f"source {syn.source!r} is not the input or an earlier layer"]
    src = shapes[syn.source]
    if syn.kind is SynapseKind.DENSE:
        want = (int(np.prod(out_shape)), int(np.prod(src)))
        return [] if syn.weight.shape == want else [
            f"dense weight shape {syn.weight.shape}, expected {want}"]
    return _check_conv(syn, src, out_shape)


def _check_conv(syn: QSynapse, src: tuple[int, ...], out: tuple[int, ...]) -> list[str]:
    if len(src) != 3 or len(out) != 3:
        return [f"conv needs (C, H, W) source and output, got {src} -> {out}"]
    if min(syn.stride + syn.dilation) < 1 or min(syn.padding) < 0 or syn.groups < 1:
        return ["conv stride/dilation must be >= 1, padding >= 0, groups >= 1"]
    o, i, kh, kw = syn.weight.shape
    if o != out[0] or i * syn.groups != src[0] or o % syn.groups:
        return [f"conv weight {syn.weight.shape} (groups {syn.groups}) does not map "
                f"{src[0]} to {out[0]} channels"]
    size = tuple((src[1 + d] + 2 * syn.padding[d] - syn.dilation[d] * (k - 1) - 1)
                 // syn.stride[d] + 1 for d, k in enumerate((kh, kw)))
    if size != tuple(out[1:]):
        return [f"conv output is {size}, layer shape says {tuple(out[1:])}"]
    return []
