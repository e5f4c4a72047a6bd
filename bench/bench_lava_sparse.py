"""Lava verification with conv synapses as Lava's Conv or as their exact sparse matrix
(Sparse), by the output-plane rule ``sims.lava_runner.SPARSE_CONV_MAX_PIXELS``: wall seconds
(runtime build included), 0 mismatches checked, for each rule value on the same samples.

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", type=Path, required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--pixels", type=int, nargs="+", default=[0, 16])
    args = p.parse_args()
    import numpy as np
    import torch
    torch.set_num_threads(1)
    import sims.lava_runner as runner
    from exporters.netx import read_netx
    from sims.verify import verify
    from toolchain.data import load_data
    q = read_netx(str(args.net))
    x = load_data(args.data).x_test[:args.samples]
    print(f"{args.net}: T={q.timesteps}, {args.samples} sample(s), one worker")
    print("| max output pixels for Sparse | conv synapses as Sparse | their synapses | "
          "Lava s | s / sample | mismatches | load |")
    print("|---|---|---|---|---|---|---|")
    for pixels in args.pixels:
        runner.SPARSE_CONV_MAX_PIXELS = pixels
        sparse = [(s, l) for l in q.layers for s in l.synapses if runner.runs_sparse(s, l)]
        nnz = sum(int(np.count_nonzero(s.weight)) * int(np.prod(l.shape[1:]))
                  for s, l in sparse)  # taps x output pixels, padding taps included
        r = verify(q, str(args.net), x, workers=1)
        print(f"| {pixels} | {len(sparse)} | ~{nnz / 1e6:.0f}M | {r['seconds']:.1f} | "
              f"{r['seconds'] / args.samples:.1f} | "
              f"{r['spike_mismatches']} / {r['readout_mismatches']} | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)
        assert (r["spike_mismatches"], r["readout_mismatches"]) == (0, 0), pixels


if __name__ == "__main__":
    main()
