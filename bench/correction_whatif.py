"""What-ifs on a finished ``bench_accuracy.py --resume`` run: FTBC's correction scaled.

``snn``: the float FTBC network of the run with its bias schedule scaled by each LAMBDA
(0 is plain conversion, 1 is FTBC itself, -0.5 pushes the other way), scored at t = T on
the test set against the labels and against the ANN's top-1; with a LAMBDA of 0 among them,
McNemar's exact test of every other against it.

``ann``: the run's ANN with each ReLU's pre-activation shifted per channel by
-MU * mean_t(b_ftbc[t]), i.e. FTBC's correction reversed in the ANN's own units (the mean
shift that plain conversion's rate error amounts to, as FTBC measured it), with and without
the SNN's clip at its thresholds; scored on the test and on the training images. If the ANN
itself gains from the shift, a calibrated SNN that tracks the ANN gives that gain up.

    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_whatif.py snn \\
        --state OUT/T32/.ftbc-resume/state.pkl --data cifar10:../shared/data/cifar10 \\
        --lambdas 0 0.5 1 -0.5
    OMP_NUM_THREADS=1 .venv/bin/python bench/correction_whatif.py ann \\
        --state OUT/T32/.ftbc-resume/state.pkl --data cifar10:../shared/data/cifar10

Diagnostics only: nothing is selected and the pipeline is not changed.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import time
from dataclasses import fields, replace
from math import comb
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.ir import ReluNode  # noqa: E402
from sims.torch_snn import simulate  # noqa: E402
from toolchain import ann as ann_module  # noqa: E402
from toolchain.data import load_data  # noqa: E402


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p for the discordant counts."""
    n = only_a + only_b
    return min(1.0, 2 * sum(comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n)


def load_run(state: Path) -> dict:
    run = pickle.loads(state.read_bytes())["run"]
    none, ftbc = run["snn"]["none"], run["snn"]["ftbc"]
    for a, b in zip(none.layers, ftbc.layers, strict=True):
        if a.bias_schedule is not None and np.any(a.bias_schedule):
            raise SystemExit(f"{state}: plain conversion's layer {a.name} has a bias schedule")
        for f in fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if (f.name != "bias_schedule" and isinstance(va, np.ndarray)
                    and not np.array_equal(va, vb)):
                raise SystemExit(f"{state}: none and ftbc differ in {a.name}.{f.name}, not only "
                                 "in the bias schedule")
    return run


def scaled(graph, lam: float):
    return replace(graph, layers=tuple(
        replace(L, bias_schedule=(lam * L.bias_schedule).astype(L.bias_schedule.dtype))
        for L in graph.layers))


def snn(run: dict, x: np.ndarray, y: np.ndarray, lambdas: list[float], batch: int) -> None:
    ann_top1 = ann_module.ann_predictions(run["ann"], x)
    print(f"ANN: accuracy {100 * (ann_top1 == y).mean():.2f} %", flush=True)
    print("| lambda | accuracy | agreement with the ANN | departures from the ANN: net labels "
          "| against lambda 0: only this right - only 0 right (McNemar p) | s |")
    print("|---|---|---|---|---|---|")
    top1 = {}
    for lam in lambdas:
        start = time.perf_counter()
        top1[lam] = simulate(scaled(run["snn"]["ftbc"], lam), x, batch_size=batch,
                             progress=True).predictions[-1]
        p, away = top1[lam], top1[lam] != ann_top1
        net = int((away & (p == y)).sum()) - int((away & (ann_top1 == y)).sum())
        versus = ""
        if 0.0 in top1 and lam != 0.0:
            only_this = int(((p != top1[0.0]) & (p == y)).sum())
            only_zero = int(((p != top1[0.0]) & (top1[0.0] == y)).sum())
            versus = f"{only_this - only_zero:+d} (p {mcnemar_p(only_this, only_zero):.2f})"
        print(f"| {lam:+.2f} | {100 * (p == y).mean():.2f} | {100 * (~away).mean():.2f} | "
              f"{int(away.sum())}: {net:+d} | {versus} | {time.perf_counter() - start:.0f} |",
              flush=True)


def ann(run: dict, sets: dict, mus: list[float]) -> None:
    graph, layers = run["ann"], {L.name: L for L in run["snn"]["ftbc"].layers}
    relus = [n.name for n in graph.nodes if isinstance(n, ReluNode)]
    missing = [r for r in relus if r not in layers]
    if missing:
        raise SystemExit(f"ReLUs without a spiking layer of that name: {missing}")
    shift = {r: torch.tensor(layers[r].bias_schedule.mean(0), dtype=torch.float32)
             for r in relus}
    theta = {r: torch.tensor(layers[r].threshold, dtype=torch.float32) for r in relus}
    relu, now = ann_module.EVALUATORS[ReluNode], {"mu": 0.0, "clip": False}

    def shifted_relu(node, ins):
        x = ins[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        out = relu(node, [x - now["mu"] * shift[node.name].view(shape)])
        return torch.minimum(out, theta[node.name].view(shape)) if now["clip"] else out

    reference = {k: ann_module.ann_predictions(graph, x) for k, (x, _) in sets.items()}
    ann_module.EVALUATORS[ReluNode] = shifted_relu
    try:
        print("| clip at the threshold | mu | " + " | ".join(
            f"{k} accuracy | {k} agreement with the ANN" for k in sets) + " |")
        print("|---|---|" + "---|---|" * len(sets))
        for clip in (False, True):
            for mu in mus:
                now.update(mu=mu, clip=clip)
                cells = []
                for k, (x, y) in sets.items():
                    p = ann_module.ann_predictions(graph, x)
                    cells += [f"{100 * (p == y).mean():.2f}",
                              f"{100 * (p == reference[k]).mean():.2f}"]
                print(f"| {'yes' if clip else 'no'} | {mu:g} | " + " | ".join(cells) + " |",
                      flush=True)
    finally:
        ann_module.EVALUATORS[ReluNode] = relu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("snn", "ann"))
    p.add_argument("--state", type=Path, required=True,
                   help="state.pkl of a finished bench_accuracy.py --resume run "
                        "(OUT/T<n>/.ftbc-resume)")
    p.add_argument("--data", required=True, help="the run's --data")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, -0.5])
    p.add_argument("--mus", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=None,
                   help="only the first N images of each set (a quick check; default: all)")
    args = p.parse_args()
    run = load_run(args.state)
    data = load_data(args.data)
    n = args.samples
    if args.what == "snn":
        snn(run, data.x_test[:n], data.y_test[:n], args.lambdas, args.batch)
    else:
        ann(run, {"test": (data.x_test[:n], data.y_test[:n]),
                  "train": (data.x_train[:n], data.y_train[:n])}, args.mus)


if __name__ == "__main__":
    main()
