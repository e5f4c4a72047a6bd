"""Residual alignment on Loihi 2: synaptic delays (what the toolchain does) vs relay neurons.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_residual_alignment.py \\
        --net OUT/network.net --data cifar10:../shared/data/cifar10 --samples 4

A residual layer's shorter input path must wait ``delay = depth(layer) - 1 - depth(source)``
steps (``hw_targets/timing.py``). Two exact ways to do it on Loihi 2:

* **delays** (the toolchain's choice): the shortcut synapse carries a synaptic delay
  (Loihi 2's 6-bit per-synapse field). In Lava: lava-nc's bit-accurate ``DelaySparse``.
* **relays**: ``delay`` extra layers of relay neurons on the shortcut, each re-emitting its
  input spike one step later (an IF neuron with weight 2 (mantissa 1) from its source and
  vth = 2 << 6 = 128: v = 128 >= vth fires and resets to 0; no input leaves v at 0). Built
  here by ``with_relays`` as a plain QuantGraph with no delays at all.

For the exported network in ``--net`` (e.g. the ResNet-20 of ``ftbc-export ... --target
loihi2-sim``) both forms are measured: neurons, connections, cores, delay slots (netlist),
Lava processes, and Lava seconds per sample (one runtime in this process, the same samples
for both forms, alternating ``--repeats`` times). Every Lava run is compared with the
emulator spike for spike (0 mismatches asserted; the relay form's shared layers must equal
the delay form's, which proves the relays exact).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters.netlist import build_netlist  # noqa: E402
from exporters.netx import read_netx, write_netx  # noqa: E402
from hw_targets import get_target  # noqa: E402
from hw_targets.timing import synaptic_delays  # noqa: E402
from core.errors import InputError  # noqa: E402
from core.ir import (INPUT, QLayer, QSynapse, QuantGraph,  # noqa: E402
                          frozen_array)


def relay_layer(name: str, source: str, shape: tuple[int, ...], depth: int,
                timesteps: int) -> QLayer:
    """One relay population: re-emits ``source``'s spikes one step later."""
    chans = shape[0]
    if len(shape) == 3:   # depthwise 1x1 conv, weight 2 (mantissa 1)
        syn = QSynapse(source=source, kind="conv", groups=chans,
                       weight=frozen_array(np.full((chans, 1, 1, 1), 2), np.int32))
    else:
        syn = QSynapse(source=source, kind="dense",
                       weight=frozen_array(2 * np.eye(chans, dtype=np.int32), np.int32))
    zeros = np.zeros(chans, dtype=np.int64)
    return QLayer(name=name, shape=tuple(shape), synapses=(syn,),
                  vth=frozen_array(np.full(chans, 2 << 6), np.int64),
                  bias_mant=frozen_array(np.zeros((timesteps, chans)), np.int64), bias_exp=0,
                  v_init=frozen_array(zeros, np.int64), depth=depth,
                  scale=frozen_array(np.ones(chans), np.float64), origin="relay")


def with_relays(q: QuantGraph) -> QuantGraph:
    """``q`` with every synaptic delay replaced by a chain of relay layers (no delays left)."""
    delays = synaptic_delays(q.layers)
    shapes = {INPUT: tuple(q.input.shape), **{l.name: tuple(l.shape) for l in q.layers}}
    depth = {INPUT: 0, **{l.name: l.depth for l in q.layers}}
    layers: list[QLayer] = []
    for layer in q.layers:
        synapses = []
        for k, (syn, delay) in enumerate(zip(layer.synapses, delays[layer.name])):
            source = syn.source
            if delay and source == INPUT:
                raise InputError("a relay cannot re-emit the graded input")
            for step in range(delay):
                relay = relay_layer(f"relay.{layer.name}.{k}.{step + 1}", source,
                                    shapes[syn.source], depth[syn.source] + step + 1,
                                    q.timesteps)
                layers.append(relay)
                source = relay.name
            synapses.append(replace(syn, source=source))
        layers.append(replace(layer, synapses=tuple(synapses)))
    return replace(q, layers=tuple(layers))


def costs(q: QuantGraph) -> dict:
    """Netlist totals and Lava's process count of one form."""
    totals = build_netlist(q, get_target(q.target))["totals"]
    processes = 1 + sum(1 + len(layer.synapses) for layer in q.layers)   # source, neurons, synapses
    return {"layers": len(q.layers), "neurons": totals["neurons"],
            "connections": totals["connections"], "cores": totals["cores"],
            "delay_slots": totals["delay_slots"], "lava_processes": processes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", required=True, help="an exported network.net (loihi2-sim)")
    p.add_argument("--data", required=True, help="the data the network was exported with")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    from sims.emulator import emulate
    from sims.verify import verify
    from toolchain.data import load_data
    q = read_netx(args.net)
    relay = with_relays(q)
    data = load_data(args.data)
    x = np.asarray(data.x_test[:args.samples])
    forms = {"delays": (q, emulate(q, x, record=True)),
             "relays": (relay, emulate(relay, x, record=True))}
    want, got = forms["delays"][1], forms["relays"][1]
    for name, trains in want.spikes.items():       # the relays are exact in the emulator too
        np.testing.assert_array_equal(got.spikes[name], trains, err_msg=name)
    np.testing.assert_array_equal(got.readout, want.readout)
    times: dict[str, list[float]] = {name: [] for name in forms}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (graph, _) in forms.items():
            write_netx(graph, Path(tmp) / f"{name}.net")
        for _ in range(args.repeats):
            for name, (graph, expected) in forms.items():
                result = verify(graph, str(Path(tmp) / f"{name}.net"), x,
                                emulator_result=expected)
                mismatches = result["spike_mismatches"], result["readout_mismatches"]
                assert mismatches == (0, 0), f"{name}: mismatches {mismatches}"
                times[name].append(result["seconds"] / args.samples)
                print(f"{name}: {result['seconds']:.1f} s for {args.samples} samples",
                      flush=True)
    load = os.getloadavg()
    print(f"\n{args.net}: T={q.timesteps}, {args.samples} samples, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; 0 mismatches in every run")
    print("| form | layers | neurons | connections | cores | delay slots | Lava processes "
          "| Lava s/sample |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (graph, _) in forms.items():
        c = costs(graph)
        print(f"| {name} | {c['layers']} | {c['neurons']:,} | {c['connections']:,} | "
              f"{c['cores']} | {c['delay_slots']:,} | {c['lava_processes']} | "
              f"{statistics.median(times[name]):.2f} |")


if __name__ == "__main__":
    main()
