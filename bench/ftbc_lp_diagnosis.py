"""Why could float FTBC lose to LP at t = T? Per-layer diagnosis on *validation* data.

Converts the model at T, calibrates it with LP and FTBC (``--keep``: the keep rule for both;
``--paper-target``: FTBC with the paper's per-step target, mean_c(abar) at every step, instead
of ``--ftbc-target ideal``, ``toolchain.calibrate.step_targets``), then on ``--diag`` validation images (training
images outside the calibration draw, as in ``bench_validation.py``; no test data) prints the
readout's error at t = T against the ANN logits (MSE, argmax agreement, the per-class mean
error and the agreement with it removed, gain and correlation) and per spiking layer:

* ``cm_err``: the channel-mean error of the T-step count, mean_c |mean(theta N / T) - mean(abar)|
  over channels, relative to mean(abar) (what both methods aim to zero; abar = clip(a, 0, theta),
  a the ANN activation of the same image);
* ``rmse``: the per-neuron error sqrt(mean (theta N / T - abar)^2) / mean(abar); the
  per-image channel error (the same after averaging over positions); ``gain`` and ``corr`` of
  theta N / T against abar (centred per channel);
* over- / under-fired: spikes per spike that the neuron fired beyond floor(U / theta) (its
  membrane ended below 0 after firing) or missed (ended >= theta), U its whole input charge:
  with reset by subtraction the count is floor(U / theta) otherwise, whatever the per-step
  biases, so these are the only way a bias *schedule* changes a count beyond its sum;
* ``b/θ``: FTBC's per-step biases b[t] (mean over channels of b[t, c] / theta_c), and
  ``lp/θ`` LP's constant;

and the validation accuracy at t = T of none / lp / ftbc and of hybrids (FTBC's schedules up
to layer k, LP's from k on: ``--hybrid``). Findings: bench/README.md, "Accuracy on residual
networks", part 4.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ftbc_lp_diagnosis.py \\
        --model bench/models/cifar_resnet20_qcfs_l8.pt2 --data cifar10:../shared/data/cifar10 \\
        --timesteps 4 --val 1000 --diag 300 --keep network [--paper-target]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_validation import validation_split  # noqa: E402
from core.ir import evolve  # noqa: E402
from sims import engine  # noqa: E402
from sims.engine import FloatArithmetic  # noqa: E402
from sims.torch_snn import encode_input, layer_drive, run_network, simulate  # noqa: E402
from toolchain import pipeline  # noqa: E402
from toolchain.ann import ann_forward  # noqa: E402
from toolchain.calibrate import calibrate  # noqa: E402
from toolchain.pipeline import Options, Run  # noqa: E402


def accuracy(snn, x, y) -> float:
    return 100.0 * float((simulate(snn, x).predictions[-1] == y).mean())


def with_schedules(snn, scheds: dict):
    return evolve(snn, layers=tuple(evolve(l, bias_schedule=scheds[l.name])
                                    if l.name in scheds else l for l in snn.layers))


def layer_stats(snn, ann, x) -> dict:
    """Per spiking layer: cm_err, rmse (module docstring) on x."""
    z, values = ann_forward(ann, x, record=True, dtype=torch.float32)
    plan = engine.compile(snn, FloatArithmetic(torch.float32))
    run = run_network(snn, x, keep_spikes=True, plan=plan)
    x_enc = encode_input(snn.input, x, torch.float32, plan.device)
    trains = {n: s.reshape(s.shape[0], s.shape[1], -1) for n, s in run.spikes.items()}
    out = {}
    for lp, layer in zip(plan.layers, snn.layers):
        if layer.readout:
            continue
        # the membrane after T steps: below 0 after firing = over-fired, >= theta = under-fired
        v = engine.initial_state(lp, len(x))
        spikes = torch.empty((snn.timesteps,) + tuple(v.shape), dtype=lp.dtype)
        engine.run_steps(lp, layer_drive(lp, x_enc, trains, 0, snn.timesteps,
                                         engine.input_current(lp, x_enc)),
                         v, 0, spikes, torch.empty_like(v))
        count = spikes.sum(0)
        assert torch.equal(count, trains[layer.name].float().sum(0))
        vth = lp.vth[None]
        over = torch.where(count > 0, torch.ceil((-v).clamp(min=0) / vth), 0 * v)
        under = torch.where(count < snn.timesteps, torch.floor(v.clamp(min=0) / vth), 0 * v)
        view = (1, layer.channels) + (1,) * (len(layer.shape) - 1)
        theta = torch.tensor(np.broadcast_to(layer.threshold, (layer.channels,)),
                             dtype=torch.float32).reshape(view)
        abar = torch.minimum(values[layer.name].clamp(min=0), theta)
        est = run.spikes[layer.name].float().sum(0) * theta / snn.timesteps
        dims = (0,) + tuple(range(2, abar.dim()))
        scale = float(abar.mean())
        e = est - est.mean(dims, keepdim=True)
        a = abar - abar.mean(dims, keepdim=True)
        out[layer.name] = {
            "cm_err": float((est.mean(dims) - abar.mean(dims)).abs().mean()) / scale,
            "rmse": float(((est - abar) ** 2).mean().sqrt()) / scale,
            "gain": float((e * a).mean() / (a * a).mean()),
            "corr": float((e * a).mean() / ((e * e).mean() * (a * a).mean()).sqrt()),
            "img_cm": float((((est - abar).mean(tuple(range(2, abar.dim())))) ** 2).mean()
                            .sqrt()) / scale if abar.dim() > 2 else float("nan"),
            "over": float(over.mean() / count.mean().clamp(min=1e-9)),
            "under": float(under.mean() / count.mean().clamp(min=1e-9))}
    final = run.readout[-1] / snn.timesteps
    fc = final - final.mean(-1, keepdim=True)  # argmax is blind to a per-image shift
    zc = z - z.mean(-1, keepdim=True)
    offset = (final - z).mean(0)  # per class: the readout's systematic error
    out["(readout)"] = {"logit_mse": float(((final - z) ** 2).mean()),
                        "agree": 100.0 * float((final.argmax(-1) == z.argmax(-1)).float().mean()),
                        "offset": offset.numpy(),
                        "gain": float((fc * zc).sum() / (zc * zc).sum()),
                        "corr": float((fc * zc).sum() / ((fc * fc).sum() * (zc * zc).sum()).sqrt()),
                        "agree_wo_offset": 100.0 * float(((final - offset).argmax(-1)
                                                          == z.argmax(-1)).float().mean())}
    return out


def schedule_stats(snn, name: str) -> np.ndarray:
    layer = next(l for l in snn.layers if l.name == name)
    theta = np.broadcast_to(layer.threshold, (layer.channels,))
    return (np.asarray(layer.bias_schedule) / theta[None]).mean(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--timesteps", type=int, default=4)
    p.add_argument("--val", type=int, default=1000)
    p.add_argument("--diag", type=int, default=200, help="images for the per-layer figures")
    p.add_argument("--keep", default="layer")
    p.add_argument("--hybrid", action="store_true", help="FTBC up to layer k, LP from k on")
    p.add_argument("--paper-target", action="store_true",
                   help="FTBC's per-step target mean_c(abar) at every step (the paper's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    opts = Options(model=Path(args.model), data=args.data, timesteps=args.timesteps,
                   verify_samples=0, progress=False, keep_rule=(args.keep,),
                   ftbc_target="paper" if args.paper_target else "ideal")
    run = pipeline.load(Run(options=opts))
    from toolchain.trace import trace as trace_model
    ann = trace_model(run.loaded, tuple(run.data.x_train.shape[1:]))
    run = pipeline.convert(replace(run, ann=ann))
    x_val, y_val = validation_split(opts, run.data, args.val)
    snn = run.snn["converted"]
    graphs, reports = {"none": snn}, {}
    for method in ("lp", "ftbc"):
        start = time.perf_counter()
        graphs[method], reports[method] = calibrate(
            snn, ann, run.calib, method=method, **pipeline._calibration_settings(opts))
        print(f"{method}: {time.perf_counter() - start:.0f} s", flush=True)
    acc = {m: accuracy(g, x_val, y_val) for m, g in graphs.items()}
    print(f"T = {args.timesteps}, keep = {args.keep}: validation none / lp / ftbc "
          + " / ".join(f"{acc[m]:.2f}" for m in ("none", "lp", "ftbc")))
    xd = x_val[:args.diag]
    stats = {m: layer_stats(g, ann, xd) for m, g in graphs.items()}
    names = [l.name for l in snn.layers if not l.readout]
    print("readout at t = T on the diagnosis images: logit MSE vs ANN / argmax agreement % "
          + ", ".join(f"{m} {stats[m]['(readout)']['logit_mse']:.3f} / "
                      f"{stats[m]['(readout)']['agree']:.1f}" for m in graphs))
    for m in graphs:
        r = stats[m]["(readout)"]
        print(f"{m}: per-class mean logit error (readout(T)/T - z_ANN) "
              + " ".join(f"{v:+.2f}" for v in r["offset"])
              + f"; agreement with that offset removed {r['agree_wo_offset']:.1f} %; "
              f"logit gain {r['gain']:.3f}, correlation {r['corr']:.3f} (per-image centred)")
    print("| layer | kept lp/ftbc | cm_err none/lp/ftbc | rmse none/lp/ftbc "
          "| per-image channel error none/lp/ftbc | gain none/lp/ftbc "
          "| corr none/lp/ftbc | over-fired none/lp/ftbc | under-fired none/lp/ftbc "
          "| ftbc b[t]/θ | lp/θ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        kept = "/".join("y" if reports[m]["layers"][name].get("kept") else "n"
                        for m in ("lp", "ftbc"))
        cm = " / ".join(f"{stats[m][name]['cm_err']:.3f}" for m in ("none", "lp", "ftbc"))
        rm = " / ".join(f"{stats[m][name]['rmse']:.3f}" for m in ("none", "lp", "ftbc"))
        gn = " / ".join(f"{stats[m][name]['gain']:.3f}" for m in ("none", "lp", "ftbc"))
        cr = " / ".join(f"{stats[m][name]['corr']:.3f}" for m in ("none", "lp", "ftbc"))
        ic = " / ".join(f"{stats[m][name]['img_cm']:.3f}" for m in ("none", "lp", "ftbc"))
        ov = " / ".join(f"{stats[m][name]['over']:.3f}" for m in ("none", "lp", "ftbc"))
        un = " / ".join(f"{stats[m][name]['under']:.3f}" for m in ("none", "lp", "ftbc"))
        fb = " ".join(f"{v:+.3f}" for v in schedule_stats(graphs["ftbc"], name))
        lp = schedule_stats(graphs["lp"], name)[0]
        print(f"| {name} | {kept} | {cm} | {rm} | {ic} | {gn} | {cr} | {ov} | {un} | {fb} "
              f"| {lp:+.3f} |", flush=True)
    if args.hybrid:
        lp_s = {l.name: l.bias_schedule for l in graphs["lp"].layers}
        ft_s = {l.name: l.bias_schedule for l in graphs["ftbc"].layers}
        print("| LP from layer k on | val acc |")
        print("|---|---|")
        for k in range(0, len(names) + 1, 3):
            mixed = {n: (ft_s[n] if i < k else lp_s[n]) for i, n in enumerate(names)}
            label = names[k] if k < len(names) else "(none: all FTBC)"
            print(f"| {label} | {accuracy(with_schedules(snn, mixed), x_val, y_val):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
