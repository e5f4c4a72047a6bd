"""report.json, accuracy.png and the on-screen summary table.

Every file is written to a temporary name in the output directory and renamed into place, so
a run that dies part-way leaves the previous good outputs intact and no partial files.
"""
from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    ``write`` creates the file itself, so it gets the usual umask permissions (mkstemp's
    would be 0600, unreadable to the rest of a team sharing the outputs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def provenance(run) -> dict[str, Any]:
    """Versions, options and seed: recorded in every artifact. Nothing run-specific (paths,
    command line, timings) so that the same inputs give byte-identical exported files."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {}
    for pkg in ("ftbc", "torch", "numpy", "h5py", "lava-nc", "lava-dl"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    opts = run.options
    return {"versions": versions, "target": opts.target, "timesteps": opts.timesteps,
            "alpha": opts.alpha, "seed": opts.seed, "threshold": opts.threshold,
            "threshold_scale": run.threshold_scale,
            "neuron": opts.neuron,
            "calibrate_fixed": opts.calibrate_fixed,
            "calibration_data": f"{opts.data} (training split)"}


def build_report(run) -> dict[str, Any]:
    """The report.json content."""
    opts = run.options
    return _jsonable({
        "model": str(opts.model), "data": opts.data, "target": opts.target,
        "timesteps": opts.timesteps, "device": _device(opts.device),
        "eval_samples": len(run.data.x_test) if opts.eval_samples is None
        else min(opts.eval_samples, len(run.data.x_test)),
        **_conversion(run),
        **run.results,
        "provenance": {**provenance(run), "command_line": opts.command_line},
        "seconds": {k: round(v, 3) for k, v in run.timings.items()},
        "peak_rss_mib": {k: round(v / 2**20, 1) for k, v in run.peak_rss.items()},
    })


def _device(name: str) -> str:
    """The torch device the simulations and calibrations ran on (``auto`` resolved)."""
    from sims.engine import resolve_device
    return str(resolve_device(name))


def _conversion(run) -> dict[str, Any]:
    """The converter's choices, notably ``fallback_channels``: channels silent on all
    calibration data, which got a fallback threshold instead of 0 (documented handling)."""
    converted = (run.snn or {}).get("converted")
    meta = dict(getattr(converted, "meta", None) or {})
    return {"conversion": meta} if meta else {}


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    """Accuracy after each step t, one line per method, the ANN as a reference line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    steps = np.arange(1, report["timesteps"] + 1)
    for method, acc in report.get("snn_accuracy", {}).items():
        ax.plot(steps, acc, marker=".", label=f"SNN float, {method}")
    if "fixed_accuracy" in report:
        ax.plot(steps, report["fixed_accuracy"], "k--", label="fixed point (emulator)")
    if report.get("ann_accuracy") is not None:
        ax.axhline(report["ann_accuracy"], color="grey", linestyle=":", label="ANN")
    ax.set(xlabel="time step t", ylabel="test accuracy (%)",
           title=f"{Path(report['model']).name} on {report['data']}, T={report['timesteps']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None (null): Python's json would write
    NaN/Infinity, which is not JSON and strict parsers reject (e.g. the held-out error of a
    network whose readout overflows)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_report(run) -> dict[str, Any]:
    """Write OUT/report.json and OUT/accuracy.png atomically; return the report."""
    out = run.options.out_dir
    report = build_report(run)
    text = json.dumps(strict_json(report), indent=2, sort_keys=False, allow_nan=False)
    atomic_write(out / "report.json", lambda p: p.write_text(text + "\n"))
    atomic_write(out / "accuracy.png", lambda p: plot_accuracy(report, p))
    return report


def _fmt(acc: Any) -> str:
    return "-" if acc is None else f"{acc:6.2f}"


def varied(candidates: list[dict[str, Any]]) -> list[str]:
    """What differs among select's candidates: threshold_scale, keep_rule or both."""
    return [k for k in ("threshold_scale", "keep_rule") if len({c[k] for c in candidates}) > 1]


def candidate_name(pair: dict[str, Any], keys: list[str], *, labelled: bool = False) -> str:
    """One of select's candidates named by what varies (``keys``): "1.15/network", or with
    ``labelled`` "threshold scale 1.15, keep rule network"."""
    values = [(k.replace("_", " "), f"{pair[k]:g}" if k == "threshold_scale" else pair[k])
              for k in keys]
    if labelled:
        return ", ".join(f"{what} {value}" for what, value in values)
    return "/".join(value for _, value in values)


def selection_line(selection: dict[str, Any]) -> str:
    """select's choice (report.json ``selection``) in one line, naming what varied."""
    keys = varied(selection["candidates"])
    scored = ", ".join(f"{candidate_name(c, keys)}: {d:.5g}"
                       for c, d in zip(selection["candidates"], selection["divergence"]))
    what = " and ".join(k.replace("_", " ") for k in keys)
    return (f"{what} {candidate_name(selection['chosen'], keys)}, chosen by FTBC's KL "
            f"divergence from the ANN on {selection['selection_samples']} training images "
            f"outside the calibration draw ({scored})")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A readable table: ANN; float none / LP / FTBC; fixed point; Lava (accuracy at t = T and
    t = min(T, 4); agreement with the ANN's top-1 at t = T)."""
    T = report["timesteps"]
    rows = [("ANN", report.get("ann_accuracy"), None, None)]
    agreement = report.get("snn_agreement", {})
    for method, acc in report.get("snn_accuracy", {}).items():
        agree = agreement.get(method)
        rows.append((f"SNN float, {method}", acc[-1], acc[min(T, 4) - 1],
                     agree[-1] if agree else None))
    if "fixed_accuracy" in report:
        acc, agree = report["fixed_accuracy"], report.get("fixed_agreement")
        rows.append((f"fixed point ({report['target']})", acc[-1], acc[min(T, 4) - 1],
                     agree[-1] if agree else None))
    lava = report.get("lava")
    if lava:
        rows.append((f"Lava, {lava['samples']} samples", lava.get("accuracy"), None, None))
    # agree@T: the share of evaluation samples whose top-1 at t = T is the ANN's
    lines = [f"{'':28s} {'acc@T':>7s} {'acc@' + str(min(T, 4)):>7s} {'agree@T':>8s}"]
    lines += [f"{name:28s} {_fmt(a):>7s} {_fmt(b):>7s} {_fmt(c):>8s}" for name, a, b, c in rows]
    if lava:
        lines.append(f"Lava vs emulator: {lava['spike_mismatches']} spike and "
                     f"{lava['readout_mismatches']} readout mismatches "
                     f"({lava['seconds']:.1f} s"
                     + (f", {lava['workers']} workers)" if lava.get("workers") else ")"))
    if report.get("selection"):
        lines.append(selection_line(report["selection"]))
    clipped = report.get("input_clipped") or {}
    if clipped.get("values"):
        lo, hi = clipped["range"]
        lines.append(f"input: {clipped['values']} of {clipped['of']} evaluation values "
                     f"exceed the input encoding chosen for the training range [{lo:g}, "
                     f"{hi:g}] and were clipped")
    if "netlist" in report:
        lines += ["", *report["netlist"]["summary"]]
    return lines
