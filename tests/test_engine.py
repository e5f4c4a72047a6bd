"""sims.engine against the independent references: the integer arithmetic against
``sims.reference`` (assert_array_equal), the float64 arithmetic against a naive per-sample
numpy loop of the SnnGraph equations, on random graphs; devices and exactness settings;
``bias_solve`` against ``run_steps``."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import InputError
from core.ir import evolve, frozen_array
from hw_targets import get_target
from sims import engine
from sims.reference import encode_input, reference_run
from sims.torch_snn import encode_input as encode_float
from tests.qgraph_builders import random_inputs, random_qgraph, random_snn
from tests.snn_reference import naive_snn

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def run_plan(plan: engine.Plan, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every layer over all T steps on the engine alone: currents from ``input_current`` and
    ``spike_current``, then ``run_steps`` with the time bias added per step (the emulator
    folds the bias into the drive instead; both must equal the reference)."""
    outputs: dict[str, torch.Tensor] = {}
    steps = plan.timesteps
    for lp in plan.layers:
        const = engine.input_current(lp, x)
        a = engine.spike_current(lp, outputs, steps, x.shape[0])
        drive = const if a is None else (a if const is None else a.add_(const))
        drive = drive.mul_(lp.shift) if lp.limits is not None else drive
        v = engine.initial_state(lp, x.shape[0])
        out = torch.empty((steps,) + tuple(v.shape), dtype=lp.dtype, device=plan.device)
        engine.run_steps(lp, drive, v, 0, out, torch.empty_like(v))
        outputs[lp.name] = out if lp.readout or lp.limits is not None else out.bool()
    return outputs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), conv=st.booleans(),
       topology=st.sampled_from(["chain", "branch", "skip"]), stress=st.booleans(),
       steps=st.integers(1, 5), n=st.integers(1, 3))
def test_integer_engine_equals_reference(seed, conv, topology, stress, steps, n):
    q = random_qgraph(seed, timesteps=steps, conv=conv, topology=topology, stress=stress)
    x_int = encode_input(q.input, random_inputs(seed, q, n) * 3 - 1)  # also clips
    plan = engine.compile(q)
    assert plan.arithmetic.target is get_target(q.target)
    with engine.exact_math(), torch.no_grad():
        got = run_plan(plan, torch.from_numpy(x_int.astype(np.float32)))
    for i in range(n):
        ref = reference_run(q, x_int[i])
        for layer in q.layers:
            mine = got[layer.name][:, i].to(torch.float64).numpy().astype(np.int64)
            np.testing.assert_array_equal(mine, ref[layer.name])


def _random_thresholds(snn, seed):
    rng = np.random.default_rng(seed)
    return evolve(snn, layers=tuple(
        l if l.readout else evolve(l, threshold=frozen_array(rng.uniform(0.5, 2.0, l.channels)))
        for l in snn.layers))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), conv=st.booleans(),
       topology=st.sampled_from(["chain", "branch", "skip"]), steps=st.integers(1, 5),
       n=st.integers(1, 3))
def test_float64_engine_equals_naive_reference(seed, conv, topology, steps, n):
    snn = _random_thresholds(random_snn(seed, timesteps=steps, conv=conv, topology=topology),
                             seed)
    x = random_inputs(seed, snn, n)
    x_enc = encode_float(snn.input, x, torch.float64)
    with torch.no_grad():
        got = run_plan(engine.compile(snn, engine.FloatArithmetic(torch.float64)), x_enc)
    ref = naive_snn(snn, x_enc.numpy())
    for layer in snn.layers:
        mine = got[layer.name].reshape(ref[layer.name].shape).to(torch.float64).numpy()
        if layer.readout:  # float sums: batched BLAS/conv may order them differently
            np.testing.assert_allclose(mine, ref[layer.name], rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(mine, ref[layer.name])


@pytest.mark.parametrize("device", DEVICES)
def test_integer_results_do_not_depend_on_the_device(device):
    from sims.emulator import emulate
    q = random_qgraph(3, timesteps=4, conv=True, topology="skip", stress=True)
    x = random_inputs(3, q, 5)
    cpu, other = emulate(q, x, record=True), emulate(q, x, record=True, device=device)
    np.testing.assert_array_equal(cpu.readout, other.readout)
    for name, spikes in cpu.spikes.items():
        np.testing.assert_array_equal(spikes, other.spikes[name])


def test_devices_resolve_and_unknown_ones_are_input_errors():
    assert engine.resolve_device(None) == torch.device("cpu")
    assert engine.resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert engine.resolve_device("auto").type == want
    with pytest.raises(InputError, match="valid: cpu, cuda, auto"):
        engine.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            engine.resolve_device("cuda")


def test_exact_math_switches_tf32_off_and_restores_the_settings():
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic)
    torch.set_float32_matmul_precision("high")
    try:
        with engine.exact_math():
            assert torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.deterministic
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before[0])
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic) == before[1:]


def test_integer_arithmetic_reads_the_target():
    t = get_target("loihi2")
    arith = engine.IntegerArithmetic(t)
    assert (arith.state_min, arith.state_max) == (t.state_min, t.state_max)
    assert arith.shift == float(1 << t.act_shift) and arith.payload_bits == 8


@pytest.mark.parametrize("arith", ["float64", "integer"])
@pytest.mark.parametrize("signed", [False, True])
def test_bias_solve_probes_and_settles_as_the_steps_run(arith, signed):
    """``bias_solve``'s ``rate(c)`` at step t is the batches' mean step-t rate of the layer
    as ``run_steps`` runs it with the chosen biases before t and c at t (times ``scale``);
    every batch settles the candidate ``solve`` returns, which later steps' rates show."""
    from core import distributed
    steps, sizes = 4, (3, 5)  # two batches of different sizes
    snn = random_snn(11, timesteps=steps, conv=True)
    snn = evolve(snn, layers=tuple(evolve(l, signed=signed and not l.readout)
                                   for l in snn.layers))
    x = random_inputs(11, snn, sum(sizes))
    if arith == "integer":
        from exporters.quantize import quantize
        q = quantize(snn, get_target("loihi2"))
        plan = engine.compile(q)
        x_enc = torch.from_numpy(encode_input(q.input, x).astype(np.float32))
    else:
        plan = engine.compile(snn, engine.FloatArithmetic(torch.float64))
        x_enc = encode_float(snn.input, x, torch.float64)
    lp = plan.layers[0]
    drive = engine.input_current(lp, x_enc)
    drive = drive.mul_(lp.shift) if lp.limits is not None else drive
    parts = torch.split(drive, list(sizes))
    scale = None if arith == "integer" else \
        torch.linspace(0.5, 2.0, lp.channels, dtype=lp.dtype)
    rng = np.random.default_rng(0)
    # candidates per step in the bias's units: whole numbers for the integer layer
    unit = float(lp.vth.max())
    candidates = [torch.from_numpy(rng.uniform(-unit, unit, (3, lp.channels))).to(lp.dtype)
                  for _ in range(steps)]
    if arith == "integer":
        candidates = [c.round() for c in candidates]
    chosen: list[torch.Tensor] = []
    rates: list[float] = []

    def reference_rate(c: torch.Tensor) -> torch.Tensor:
        schedule = torch.stack(chosen + [c]).reshape(-1, lp.channels, 1)
        run = replace(lp, schedule=schedule)
        total = 0
        for part in parts:
            state = engine.initial_state(run, part.shape[0])
            out = torch.empty((len(schedule),) + tuple(engine.membrane(run, state).shape),
                              dtype=lp.dtype)
            engine.run_steps(run, part, state, 0, out,
                             torch.empty_like(engine.membrane(run, state)))
            spikes = out[-1].view(part.shape[0], lp.channels, -1)
            total = total + distributed.rate(spikes, (0, 2))
        return (total if scale is None else scale * total) / len(parts)

    def solve(t, rate):
        assert t == len(chosen)
        for c in candidates[t]:
            got = rate(c)
            np.testing.assert_array_equal(got.numpy(), reference_rate(c).numpy())
            rates.append(float(got.sum()))
        chosen.append(candidates[t][t % 3])
        return chosen[-1]

    engine.bias_solve(lp, [[p] * steps for p in parts], lambda c: c,
                      lambda fired: distributed.rate(fired, (0, 2)), solve, scale)
    assert len(chosen) == steps
    assert min(rates) < max(rates)  # the candidates move the rate
