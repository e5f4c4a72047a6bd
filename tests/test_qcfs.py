"""QCFS-trained networks: recognised from every front end, converted with their learned
thresholds, exact against torch, and spike-exact in Lava through the whole CLI."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.errors import UnsupportedModelError
from core.ir import AnnGraph, QcfsNode
from sims.torch_snn import run_network
from tests.ann_builders import residual_graph
from tests.models import IMG, QCFS, head, qcfs_net, qcfs_residual_net
from tests.test_cli import FAST, run_cli
from tests.test_onnx import onnx_graph, to_onnx
from tests.test_trace import TOL, as_form, assert_equivalent
from toolchain.ann import ann_forward
from toolchain.cli import main
from toolchain.convert import convert
from toolchain.load import load_model
from toolchain.memory import neuron_count
from toolchain.qcfs import reduce_chain
from toolchain.trace import trace

VARIANTS = {  # QcfsNet keyword arguments: the spellings a user's model may use
    "public_code": {},
    "per_channel": {"per_channel": True},
    "clamp_first": {"clamp_first": True, "levels": 8},
    "tensor_constant": {"per_channel": True, "up_as": "tensor"},
    "float_constant": {"up_as": "float", "levels": 2},
    "buffer": {"up_as": "buffer", "levels": 3},
}


def _graph(model: nn.Module, form: str, shape: tuple = IMG) -> AnnGraph:
    if form == "onnx":
        return onnx_graph(to_onnx(model, shape), shape)
    return trace(as_form(model, shape, form), shape)


def _qcfs_modules(model: nn.Module) -> list[QCFS]:
    return [m for m in model.modules() if isinstance(m, QCFS)]


def _assert_learned(graph: AnnGraph, model: nn.Module) -> None:
    """One QcfsNode per QCFS module, in order, with its threshold (per channel) and L."""
    nodes = [n for n in graph.nodes if isinstance(n, QcfsNode)]
    mods = _qcfs_modules(model)
    assert len(nodes) == len(mods) == 3
    for node, mod in zip(nodes, mods):
        up = torch.as_tensor(mod.up).detach().double().reshape(-1).numpy()
        # theta = (up / L) * L in float64: the model's float32 value to ~1 ulp of float64
        np.testing.assert_allclose(node.threshold, np.broadcast_to(up, node.threshold.shape),
                                   rtol=1e-14)
        assert node.levels == mod.t


@pytest.mark.parametrize("form", ["module", "export", "scripted", "onnx"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_recognised_from_every_front_end(variant: str, form: str) -> None:
    """The IR's ANN equals torch; thresholds and levels are the model's own. TorchScript cannot
    save the straight-through autograd.Function: its models use torch.floor."""
    model = qcfs_net(plain=form == "scripted", **VARIANTS[variant])
    graph = _graph(model, form)
    assert [type(n).__name__ for n in graph.nodes] == [
        "InputNode", "ConvNode", "QcfsNode", "AvgPoolNode", "ConvNode", "QcfsNode",
        "FlattenNode", "LinearNode", "QcfsNode", "LinearNode"]
    _assert_learned(graph, model)
    x = torch.rand(64, *IMG, generator=torch.Generator().manual_seed(3)) * 4 - 1
    with torch.no_grad():
        want = model(x)
    assert (ann_forward(graph, x) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("form", ["module", "export"])
def test_qcfs_after_a_residual_sum(form: str) -> None:
    """QCFS's ResNets apply the activation to the residual sum: nothing to fold its scale
    into, and nothing needed (x / theta * L + 1/2, floor, / L * theta has identity input)."""
    graph = assert_equivalent(qcfs_residual_net(), (1, 8, 8), form)
    acts = [n for n in graph.nodes if isinstance(n, QcfsNode)]
    assert [a.name for a in acts] == ["stem.2", "layer1.0.relu", "layer1.0.relu_1",
                                      "layer1.1.relu", "layer1.1.relu_1"]
    assert [graph.node(a.inputs[0]).__class__.__name__ for a in acts][2::2] == ["AddNode"] * 2
    snn = convert(graph, np.random.default_rng(0).random((16, 1, 8, 8)), timesteps=4)
    assert [len(layer.synapses) for layer in snn.layers] == [1, 1, 2, 1, 2, 1]


def test_state_dict_with_arch(tmp_path: Path) -> None:
    model = qcfs_net(levels=8, per_channel=True)
    with torch.no_grad():
        for m in _qcfs_modules(model):
            m.up.mul_(1.5)  # "learned": differs from what the constructor draws
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    loaded = load_model(tmp_path / "weights.pt", arch="tests.models:QcfsNet",
                        arch_kwargs={"levels": 8, "per_channel": True})
    graph = trace(loaded, IMG)
    _assert_learned(graph, model)


def _steps(theta: float, levels: int, clamp_first: bool, relu: bool = False) -> tuple:
    """The elementwise steps of QCFS after a layer (theta, L), as the tracer records them."""
    one, zero = np.ones(1), np.zeros(1)
    pre = (("clamp", zero, np.full(1, np.inf)),) if relu else ()
    if clamp_first:
        return pre + (("affine", one / theta, zero), ("clamp", zero, one),
                      ("affine", one * levels, zero + 0.5), ("floor",),
                      ("affine", one / levels, zero), ("affine", one * theta, zero))
    return pre + (("affine", one / theta, zero), ("affine", one * levels, zero + 0.5),
                  ("floor",), ("affine", one / levels, zero), ("clamp", zero, one),
                  ("affine", one * theta, zero))


@pytest.mark.parametrize("clamp_first", [False, True])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("theta, levels", [(0.37, 1), (2.5, 4), (8.0, 16)])
def test_reduce_chain_gives_threshold_levels_and_identity_input(theta, levels, clamp_first,
                                                                relu) -> None:
    scale, shift, got_theta, got_levels = reduce_chain(
        _steps(theta, levels, clamp_first, relu), 1)
    np.testing.assert_allclose(scale, 1.0, rtol=1e-12)
    np.testing.assert_allclose(shift, 0.0, atol=1e-12)
    np.testing.assert_allclose(got_theta, theta, rtol=1e-12)
    assert got_levels == levels


@pytest.mark.parametrize("steps", [
    (("floor",),),                                                   # floor alone
    (("affine", np.ones(1) * 4, np.zeros(1)), ("floor",)),           # no upper clamp
    _steps(1.0, 4, False) + (("affine", np.ones(1), np.ones(1)),),   # lowest level 1, not 0
    _steps(1.0, 4, False) + (("affine", -np.ones(1), np.zeros(1)),),  # negative scale
    _steps(1.0, 4, False) + (("floor",),),                           # a second floor
])
def test_reduce_chain_refuses_what_is_not_qcfs(steps) -> None:
    assert reduce_chain(steps, 1) is None


class _OtherFloors(nn.Module):
    """floor without the clip, round, a floor on the input, and a MaxPool: all refused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * 3 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.floor(self.conv1(x) * 4) / 4
        b = torch.round(self.conv2(x))
        c = self.pool(torch.floor(x))
        return self.fc(torch.cat([a[:, :, ::2, ::2], b[:, :, ::2, ::2], c], 1).flatten(1))


@pytest.mark.parametrize("form", ["export", "scripted"])
def test_other_floor_and_round_uses_reported_together(form: str) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        trace(as_form(_OtherFloors().eval(), IMG, form), IMG)
    text = "\n".join(err.value.problems)
    assert text.count("not part of a QCFS activation") == 2, text  # floor after conv1, on x
    assert "round has no integrate-and-fire equivalent" in text
    assert "replace MaxPool2d by AvgPool2d" in text


def test_scale_after_a_relu_keeps_its_refusal() -> None:
    model = head(nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), _Scale()), IMG).eval()
    with pytest.raises(UnsupportedModelError, match="not preceded by a Conv2d or Linear"):
        trace(as_form(model, IMG, "export"), IMG)


class _Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def test_convert_keeps_learned_thresholds_and_half_threshold_start() -> None:
    """No threshold search, v_init 1/2 and no input shift for QCFS layers, whatever the
    options say; recorded in meta."""
    model = qcfs_net(per_channel=True)
    graph = _graph(model, "export")
    x = torch.rand(32, *IMG).numpy()
    snn = convert(graph, x, timesteps=3, threshold="percentile", percentile=50.0, v_init=0.0,
                  input_shift=True)
    nodes = [n for n in graph.nodes if isinstance(n, QcfsNode)]
    for layer, node in zip(snn.layers, nodes):
        np.testing.assert_array_equal(layer.threshold, node.threshold)
        np.testing.assert_array_equal(layer.v_init, 0.5)
        assert snn.meta["learned_thresholds"][layer.name]["threshold"] == list(node.threshold)
        assert snn.meta["learned_thresholds"][layer.name]["levels"] == 4
    assert snn.layers[-1].readout


@pytest.mark.parametrize("levels", [1, 4, 8])
def test_snn_at_t_equal_l_is_the_qcfs_network(levels: int) -> None:
    """One QCFS layer before the readout: after T = L steps the IF neurons (threshold theta,
    v[0] = theta / 2) give exactly the QCFS activation, so readout / T equals torch's logits."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 4, 3), QCFS(up=0.8, t=levels, channels=4))
    model = head(body, IMG).eval()
    graph = _graph(model, "export")
    x = torch.rand(200, *IMG, generator=torch.Generator().manual_seed(5))
    snn = convert(graph, x.numpy(), timesteps=levels)
    run = run_network(snn, x.double(), dtype=torch.float64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    np.testing.assert_allclose((run.readout[-1] / levels).numpy(), want.numpy(), atol=1e-9)


@pytest.mark.lava
def test_export_program_through_cli_is_spike_exact_in_lava(tmp_path: Path) -> None:
    """The issue's acceptance: a torch.export'ed QCFS model through ``ftbc-export model.pt2
    --target loihi2-sim``: 0 Lava mismatches, the learned thresholds in the report, FTBC, LP,
    fixed point and the netlist all run."""
    model = qcfs_net(in_shape=(1, 8, 8), per_channel=True, classes=10)
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 8, 8),)),
                      str(tmp_path / "model.pt2"))
    out = tmp_path / "run"
    proc = run_cli(str(tmp_path / "model.pt2"), "--target", "loihi2-sim", "--data", "digits",
                   "--out", str(out), "--verify-samples", "4", *FAST)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["lava"]["samples"] == 4
    assert report["lava"]["spike_mismatches"] == 0 and report["lava"]["readout_mismatches"] == 0
    learned = report["conversion"]["learned_thresholds"]
    assert list(learned) == ["features.2", "features.6", "classifier.2"]
    for name, mod in zip(learned, _qcfs_modules(model)):
        want = [float(v) for v in mod.up.detach().reshape(-1)]
        assert learned[name]["threshold"] == pytest.approx(want, rel=1e-14)
    assert set(report["snn_accuracy"]) == {"none", "lp", "ftbc"}
    assert len(report["fixed_accuracy"]) == 4 and (out / "netlist.json").stat().st_size > 0


def test_nir_target(tmp_path: Path) -> None:
    model = qcfs_net(in_shape=(1, 8, 8), classes=10)
    torch.export.save(torch.export.export(model, (torch.rand(2, 1, 8, 8),)),
                      str(tmp_path / "model.pt2"))
    assert main([str(tmp_path / "model.pt2"), "--target", "nir", "--data", "digits", "--out",
                 str(tmp_path / "nir"), *FAST]) == 0
    assert (tmp_path / "nir" / "network.nir").stat().st_size > 0


def test_ftbc_ideal_neuron_of_a_qcfs_layer_is_fed_the_activations_input(monkeypatch) -> None:
    """FTBC's ideal per-step target (``--ftbc-target ideal``) on a QCFS net at T < L (``toolchain.calibrate.step_targets``):
    the ideal neuron gets the QCFS activation's *input* (its quantised output sits on count
    boundaries). The first layer's current is constant, so unbiased it fires exactly the ideal
    neuron's profile and step 1's update is the shift alone, alpha (mean_c(abar) - theta
    mean_c(n_T) / T), n_T counted on the input; the cached FTBC still equals the authors'
    full-forwards loop (which computes the target on its own)."""
    import toolchain.calibrate as cal
    from tests.ftbc_full_forward import ftbc_full_forward
    monkeypatch.setattr(cal, "DTYPE", torch.float64)
    graph = _graph(qcfs_net(per_channel=True, levels=8), "export")
    x = torch.rand(64, *IMG, generator=torch.Generator().manual_seed(3)).numpy()
    steps = 3
    snn = convert(graph, x, timesteps=steps)
    ours, _ = cal.calibrate(snn, graph, x, method="ftbc", batches=1, batch_size=64,
                            iterations=1, holdout=0.0, step_target="ideal")
    first = snn.layers[0]
    _, values = ann_forward(graph, x, record=True, dtype=torch.float64)
    node = graph.node(first.name)
    theta = torch.tensor(np.asarray(first.threshold, np.float64)).reshape(-1, 1, 1)
    z = torch.minimum(values[node.inputs[0]].clamp(min=0), theta)
    n_t = torch.clamp(torch.floor((theta / 2 + steps * z) / theta + cal.TIE), 0, steps)
    abar = torch.minimum(values[first.name].clamp(min=0), theta)
    shift = abar.mean((0, 2, 3)) - theta.reshape(-1) * n_t.mean((0, 2, 3)) / steps
    np.testing.assert_allclose(ours.layers[0].bias_schedule[0], 0.5 * shift.numpy(), atol=1e-9)
    ref = ftbc_full_forward(snn, graph, [x], alpha=0.5, iterations=1, step_target="ideal")
    for mine, theirs in zip(ours.layers, ref.layers):
        np.testing.assert_allclose(mine.bias_schedule, theirs.bias_schedule, atol=1e-9)


@pytest.mark.parametrize("levels", [None, 4])
def test_memory_estimate_counts_every_neuron_convert_builds(levels: int | None) -> None:
    """The memory estimate's neuron count is the converted network's, QCFS layers included
    (it once counted ReLU layers only, so a QCFS model's estimate was the readout's alone)."""
    if levels is None:
        graph, shape = residual_graph(seed=2, channels=6), (1, 8, 8)
    else:
        shape = (1, 8, 8)
        graph = trace(as_form(qcfs_residual_net(levels), shape, "export"), shape)
    x = np.random.default_rng(0).random((16, *shape)).astype(np.float32)
    snn = convert(graph, x, timesteps=4)
    sizes = [int(np.prod(layer.shape)) for layer in snn.layers]
    neurons, widest, classes = neuron_count(graph, x)
    assert neurons == sum(sizes)
    assert widest == max(sizes[:-1]) and classes == sizes[-1]
