"""sims.engine against the independent references: the integer arithmetic against
``sims.reference`` (assert_array_equal), the float64 arithmetic against a naive per-sample
numpy loop of the SnnGraph equations, on random graphs; devices and exactness settings."""
from __future__ import annotations

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
