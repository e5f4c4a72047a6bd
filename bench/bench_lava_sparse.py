"""Lava verification with conv synapses as Lava's Conv or as their exact sparse matrix
(Sparse), by the output-plane rule ``sims.lava_runner.SPARSE_CONV_MAX_PIXELS``: wall seconds
(runtime build included), peak memory of the whole process tree (proportional set size,
sampled every 0.5 s) and 0 mismatches checked, for each rule value on the same samples.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lava_sparse.py --net OUT/network.net \\
        --data cifar10:../shared/data/cifar10 --samples 1 --pixels 0 4 16 64

``--pixels 0``: every conv through Conv (no Sparse); 16: output planes up to 4 x 4 (the
default). One worker process, values run one after the other.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _connections(syn, src: tuple, out: tuple) -> int:
    """Non-zero connections of a conv synapse (what ``conv_matrix`` holds): per kernel tap,
    its non-zero weights times the output pixels whose input position is in range."""
    import numpy as np
    _, h, w = src
    _, oh, ow = out
    (sy, sx), (py, px), (dy, dx) = syn.stride, syn.padding, syn.dilation

    def valid(n_out: int, n_in: int, s: int, p: int, d: int, k: int) -> int:
        pos = np.arange(n_out) * s - p + k * d
        return int(((pos >= 0) & (pos < n_in)).sum())
    return sum(int(np.count_nonzero(syn.weight[:, :, i, j]))
               * valid(oh, h, sy, py, dy, i) * valid(ow, w, sx, px, dx, j)
               for i in range(syn.weight.shape[2]) for j in range(syn.weight.shape[3]))


def _tree_pss_mib() -> float:
    """Proportional set size (MiB) of this process and all its descendants (the Lava
    workers and their runtime processes; shared pages counted once in all)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class PeakMemory:
    """Samples ``_tree_pss_mib`` every half second in a thread; ``peak`` after ``stop``."""

    def __init__(self):
        import threading
        self.peak, self.done = 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.5):
            self.peak = max(self.peak, _tree_pss_mib())

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--pixels", type=int, nargs="+", default=[0, 16])
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    import sims.lava_runner as runner
    from exporters.netx import read_netx
    from sims.verify import verify
    from toolchain.data import load_data
    q = read_netx(str(args.net))
    shapes = {"input": tuple(q.input.shape), **{l.name: tuple(l.shape) for l in q.layers}}
    x = load_data(args.data).x_test[:args.samples]
    print(f"{args.net}: T={q.timesteps}, {args.samples} sample(s), one worker")
    print("| max output pixels for Sparse | conv synapses as Sparse | their connections | "
          "Lava s | s / sample | peak PSS MiB (all processes) | mismatches | load |")
    print("|---|---|---|---|---|---|---|---|")
    for pixels in args.pixels:
        runner.SPARSE_CONV_MAX_PIXELS = pixels
        sparse = [(s, l) for l in q.layers for s in l.synapses if runner.runs_sparse(s, l)]
        nnz = sum(_connections(s, shapes[s.source], l.shape) for s, l in sparse)
        meter = PeakMemory()
        r = verify(q, str(args.net), x, workers=1)
        peak = meter.stop()
        print(f"| {pixels} | {len(sparse)} | {nnz / 1e6:.1f}M | {r['seconds']:.1f} | "
              f"{r['seconds'] / args.samples:.1f} | {peak:,.0f} | "
              f"{r['spike_mismatches']} / {r['readout_mismatches']} | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)
        assert (r["spike_mismatches"], r["readout_mismatches"]) == (0, 0), pixels


if __name__ == "__main__":
    main()
