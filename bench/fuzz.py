"""Long fuzz run: >= 10,000 cases over damaged model files, .net files, data files, CLI
argument combinations and option values, and SIGINT/SIGTERM to a real run's process group
at random moments (generators: ``tests/fuzz_cases.py``; the short run is
``tests/test_fuzz.py``).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz.py                    # 10,000 cases
    .venv/bin/python bench/fuzz.py --cases 200 --kind cli --first 5000   # one kind, a range
    .venv/bin/python bench/fuzz.py --atheris --kind net --runs 5000      # coverage-guided

Case ``i`` of kind ``k`` is ``run_case(k, i)``: deterministic, so a failure is reproduced by
``--kind k --first i --cases 1``. Cases run in worker subprocesses (one per kind) that log
each case before running it: a crash of the interpreter itself (a segfault in torch, h5py
or onnx) is recorded as a failure of that case and the worker is restarted after it.
The summary (cases, time, outcomes, failures) is printed and, with ``--record``, written to
``bench/results_fuzz.md``.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Share of the cases per kind (CLI cases run the pipeline, about 100x slower than the rest;
# a signal case starts a real process and waits up to 12 s before its signal).
MIX = {"model": 0.34, "net": 0.25, "data": 0.335, "cli": 0.07, "signal": 0.005}


def worker(kind: str, first: int, count: int, log: Path, seeds_dir: Path) -> None:
    """Run cases first..first+count-1, appending one JSON line per case to ``log``."""
    import torch
    torch.set_num_threads(1)
    from tests.fuzz_cases import Failure, make_seeds, run_case
    seeds = make_seeds(seeds_dir)
    with open(log, "a", buffering=1) as out:
        for seed in range(first, first + count):
            out.write(json.dumps({"seed": seed, "start": True}) + "\n")
            start = time.perf_counter()
            try:
                result = {"outcome": run_case(kind, seed, seeds)}
            except Failure as exc:
                result = {"outcome": "FAILURE", "error": str(exc)[:2000]}
            result.update(seed=seed, seconds=round(time.perf_counter() - start, 4))
            out.write(json.dumps(result) + "\n")


def _read_log(log: Path) -> tuple[list[dict], int | None]:
    """Finished cases, and the seed that started without finishing (a crash), if any."""
    done, started = [], None
    if log.exists():
        for line in log.read_text().splitlines():
            item = json.loads(line)
            if item.get("start"):
                started = item["seed"]
            else:
                done.append(item)
                started = None
    return done, started


def run_kind(kind: str, first: int, count: int, work: Path) -> list[dict]:
    """All cases of one kind through restartable worker subprocesses."""
    log, results, seed = work / f"{kind}.jsonl", [], first
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    while seed < first + count:
        log.unlink(missing_ok=True)
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--first", str(seed),
             "--cases", str(first + count - seed), "--log", str(log),
             "--seeds-dir", str(work / "seeds")],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        done, crashed = _read_log(log)
        results += done
        if proc.returncode == 0 and crashed is None:
            break
        if crashed is None:  # died outside a case (e.g. while building seeds)
            raise SystemExit(f"{kind} worker failed: {proc.stderr[-3000:]}")
        results.append({"seed": crashed, "outcome": "FAILURE",
                        "error": f"worker died (exit {proc.returncode}): "
                                 f"{proc.stderr[-1500:]}"})
        seed = crashed + 1
    return results


def summarize(results: dict[str, list[dict]], seconds: float, command: str) -> str:
    """The markdown record: per kind, cases, outcomes, failures, time."""
    lines = ["| kind | cases | outcomes | failures | case time (s) |",
             "|---|---|---|---|---|"]
    total = failures = 0
    for kind, items in results.items():
        counts = collections.Counter(r["outcome"] for r in items)
        bad = counts.pop("FAILURE", 0)
        spent = sum(r.get("seconds", 0.0) for r in items)
        shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"| {kind} | {len(items)} | {shown} | {bad} | {spent:.1f} |")
        total, failures = total + len(items), failures + bad
    lines.append(f"| **all** | **{total}** | | **{failures}** | wall {seconds:.0f} |")
    details = [f"- `{k}` seed {r['seed']}: {r['error'][:300]}"
               for k, items in results.items() for r in items if r["outcome"] == "FAILURE"]
    return "\n".join([f"command: `{command}`", "", *lines, "",
                      "failures:" if details else "failures: none", *details[:50]])


def fuzz_atheris(kind: str, runs: int) -> None:
    """Coverage-guided: atheris mutates the bytes of a seed file of ``kind`` (model, net or
    data) and the harness asserts the same contract. Optional (``pip install --no-deps
    atheris``)."""
    import atheris
    # Everything imported here is instrumented, torch, numpy and h5py's Python parts
    # included (slow to start, about a minute, but the parsers' branches guide the fuzzer).
    with atheris.instrument_imports():
        import exporters.netx  # noqa: F401
        import toolchain.data  # noqa: F401
        import toolchain.load  # noqa: F401
    from tests.fuzz_cases import make_seeds, outcome
    seeds = make_seeds(Path(tempfile.mkdtemp(prefix="ftbc-atheris-")))
    path = seeds.scratch({"model": "m.pt", "net": "n.net", "data": "d.npz"}[kind])
    call = {"model": lambda: toolchain.load.load_model(path, arch="tests.models:TinyNet",
                                                       arch_kwargs={"hidden": 5}),
            "net": lambda: exporters.netx.read_netx(path),
            "data": lambda: toolchain.data.load_data(f"npz:{path},{path}")}[kind]

    def one(data: bytes) -> None:
        path.write_bytes(data)
        outcome(call)  # raises Failure: atheris reports it with the input
    corpus = Path(tempfile.mkdtemp(prefix="ftbc-corpus-"))
    src = {"model": seeds.models["state"], "net": seeds.nets["dense"],
           "data": seeds.data["test"]}[kind]
    (corpus / "seed").write_bytes(src.read_bytes())
    crashes = ROOT / "bench" / "out" / "fuzz-crashes"  # libFuzzer writes failing inputs here
    crashes.mkdir(parents=True, exist_ok=True)
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-artifact_prefix={crashes}/", str(corpus)],
                  one)
    atheris.Fuzz()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10_000)
    p.add_argument("--first", type=int, default=0, help="first case seed (per kind)")
    p.add_argument("--kind", choices=tuple(MIX), help="only this kind (default: the mix)")
    p.add_argument("--record", action="store_true", help="write bench/results_fuzz.md")
    p.add_argument("--atheris", action="store_true")
    p.add_argument("--runs", type=int, default=2000, help="atheris runs")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seeds-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.first, args.cases, args.log, args.seeds_dir)
    if args.atheris:
        return fuzz_atheris(args.kind or "net", args.runs)
    plan = {args.kind: args.cases} if args.kind else \
        {k: round(args.cases * share) for k, share in MIX.items()}
    start, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="ftbc-fuzz-") as tmp:
        for kind, count in plan.items():
            t0 = time.perf_counter()
            results[kind] = run_kind(kind, args.first, count, Path(tmp))
            print(f"{kind}: {count} cases in {time.perf_counter() - t0:.0f} s", flush=True)
    command = "OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz.py " + " ".join(sys.argv[1:])
    text = summarize(results, time.perf_counter() - start, command.strip())
    print(text)
    if args.record:
        header = ("# Fuzz run (bench/fuzz.py)\n\nMachine: "
                  f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                  "(shared), 1 thread per worker; Python "
                  f"{platform.python_version()}.\nA failure is any case that ends in an "
                  "unhandled exception, exit code 1 or outside {0, 2, 3, 4}, a multi-line "
                  "InputError, or a crashed interpreter; for a signal case, anything but "
                  "exit 0 with this run's outputs or 130/143 with the one-line message, "
                  "the previous outputs intact and no staging folder or process left.\n\n")
        (ROOT / "bench" / "results_fuzz.md").write_text(header + text + "\n")
    if any(r["outcome"] == "FAILURE" for items in results.values() for r in items):
        sys.exit(1)


if __name__ == "__main__":
    main()
