"""Layout ops (slice, narrow, zero pad, cat) and small residual nets, end to end.

Every front end (module/torch.export, TorchScript scripted and traced, ONNX) gives an IR that
equals torch within 1e-4; conversion folds each layout op into synapses exactly (float64);
the residual nets run in the float SNN and, quantized for Loihi 2, in the emulator spike for
spike equal to the integer reference; what cannot fold is reported all at once.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import UnsupportedModelError
from exporters.quantize import quantize, validate
from hw_targets import get_target
from hw_targets.timing import synaptic_delays
from sims.torch_snn import run_network
from tests.residual_models import LAYOUT_ZOO, RESIDUAL_MODELS, SHAPE
from tests.test_convert import _pre_activation_check
from tests.test_emulator import assert_matches_reference
from tests.test_onnx import assert_same, onnx_graph, to_onnx
from tests.test_trace import FORMS, as_form, assert_equivalent, kinds
from toolchain.ann import ann_forward
from toolchain.cli import main
from toolchain.convert import convert
from toolchain.normalize import normalize
from toolchain.trace import trace

torch.set_num_threads(1)
CASES = {**RESIDUAL_MODELS, "zoo": (LAYOUT_ZOO, SHAPE)}
X = np.random.default_rng(0).random((48, *SHAPE))


def _graph(case: str):
    make, shape = CASES[case]
    return trace(as_form(make(), shape, "module"), shape)


# --------------------------------------------------------------------------- front ends

@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_ir_equals_torch(case: str, form: str) -> None:
    make, shape = CASES[case]
    graph = assert_equivalent(make(), shape, form)  # within 1e-4 of the torch model
    layout = {"option_a": {"Slice", "Pad"}, "inception": {"Concat"}, "dense": {"Concat"},
              "zoo": {"Slice", "Pad", "Concat"}}.get(case, set())
    assert layout <= set(kinds(graph))


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("case", sorted(CASES))
def test_onnx_slice_pad_concat(case: str, opset: int) -> None:
    make, shape = CASES[case]
    assert_same(onnx_graph(to_onnx(make(), shape, opset_version=opset), shape), _graph(case),
                shape)


def test_option_a_traces_to_slices_and_a_channel_pad() -> None:
    graph = _graph("option_a")
    slices = [n for n in graph.nodes if type(n).__name__ == "SliceNode"]
    assert [(n.dim, n.start, n.stop, n.step) for n in slices] == [(2, 0, 8, 2), (3, 0, 8, 2)]
    pad = next(n for n in graph.nodes if type(n).__name__ == "PadNode")
    assert pad.pads == ((2, 2), (0, 0), (0, 0)) and pad.origin.startswith("body.shortcut (")


class _Crop(nn.Module):
    """Negative pads crop; narrow with a negative start; an unpadded conv reads the crop."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x))
        b = F.pad(a, (-1, -2, 0, -2)).narrow(2, -5, 5)           # (4, 5, 5)
        return self.fc(torch.relu(self.c2(b)).flatten(1))


@pytest.mark.parametrize("form", ["module", "scripted", "traced"])
def test_negative_pads_crop_and_fold(form: str) -> None:
    torch.manual_seed(0)
    graph = assert_equivalent(_Crop().eval(), SHAPE, form)
    _pre_activation_check(graph, convert(graph, X, timesteps=4), X[:6])


# --------------------------------------------------------------------------- folding

@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_ops_fold_exactly(case: str) -> None:
    graph = _graph(case)
    snn = convert(graph, X, timesteps=4)
    _pre_activation_check(graph, snn, X[:6])  # synapses + bias == ANN pre-activation, 1e-10
    assert len(snn.layers) == kinds(graph).count("Relu") + 1  # no neurons of their own


def test_option_a_shortcut_is_a_1x1_stride2_conv_with_zero_rows() -> None:
    snn = convert(_graph("option_a"), X, timesteps=4)
    syn = next(s for s in snn.layer("body_2").synapses if s.source == "stem.1")
    assert syn.kind == "conv" and syn.weight.shape == (8, 4, 1, 1)
    assert syn.stride == (2, 2) and syn.padding == (0, 0) and syn.groups == 1
    want = np.zeros((8, 4))
    want[2:6] = np.eye(4)  # F.pad(..., (0, 0, 0, 0, 2, 2)): channels 2..5 carry the input
    np.testing.assert_array_equal(syn.weight[:, :, 0, 0], want)


def test_concat_gives_each_input_its_own_synapses() -> None:
    graph = _graph("inception")
    snn = convert(graph, X, timesteps=4)
    merge = graph.node("body.merge.0")
    syns = {s.source: s for s in snn.layer("body_3").synapses}
    assert sorted(syns) == ["body", "body_1"]  # relu(a) -> channels 0..2, relu(b) -> 3..4
    np.testing.assert_allclose(syns["body"].weight, merge.weight[:, :3], rtol=1e-12)
    np.testing.assert_allclose(syns["body_1"].weight, merge.weight[:, 3:], rtol=1e-12)


def _convert_problems(model: nn.Module) -> list[str]:
    graph = trace(as_form(model.eval(), SHAPE, "module"), SHAPE)
    with pytest.raises(UnsupportedModelError) as err:
        convert(graph, X, timesteps=4)
    return err.value.problems


class _NotFoldable(nn.Module):
    """A zero pad of a biased 1x1 conv's output (the pad's zeros are not the bias) and a crop
    read by a padded conv (its padding would see the cropped values)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 9 * 8 + 4 * 7 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = torch.relu(F.pad(self.c1(x), (0, 0, 1, 0)))        # (4, 9, 8)
        cropped = torch.relu(self.c2(padded[:, :, 2:]))              # (4, 7, 8)
        return self.fc(torch.cat([padded.flatten(1), cropped.flatten(1)], 1))


def test_what_does_not_fold_is_reported_with_layer_and_fix() -> None:
    problems = _convert_problems(_NotFoldable())
    assert len(problems) == 2, problems
    bias, crop = problems
    assert bias.startswith("relu (aten::relu") and "not constant per channel" in bias
    assert "pad only activations (after the ReLU)" in bias
    assert crop.startswith("relu_1 (aten::relu") and "slice (aten::slice" in crop
    assert "a crop followed by padding" in crop and "crop after the conv" in crop


# --------------------------------------------------------------------------- refusals

class _Fn(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class _Refused(nn.Module):
    """Layout ops that are not exact linear maps of one sample, each in its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.reflect = _Fn(lambda a: F.pad(a, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1])
        self.value = _Fn(lambda a: F.pad(a, (1, 1), value=0.5)[:, :, :, 1:-1])
        self.batch = _Fn(lambda a: torch.cat([a[1:], a[:1]], 0))
        self.const = _Fn(lambda a: torch.cat([a[:, :2], torch.ones(2, 1, 8, 8)], 1))
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x))
        return self.fc((self.reflect(a) + self.value(a) + self.batch(a) + self.const(a))
                       .flatten(1))


def test_refused_layout_ops_are_all_reported_at_once() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        trace(as_form(_Refused().eval(), SHAPE, "export"), SHAPE)
    problems = err.value.problems
    expect = [("reflect (_Fn): pad", "mode 'reflect'"),
              ("value (_Fn): pad", "pads with the constant 0.5"),
              ("batch (_Fn): slice", "batch axis"), ("batch (_Fn): slice", "batch axis"),
              ("batch (_Fn): cat", "batch axis"),
              ("const (_Fn): cat", "with a constant tensor")]
    assert len(problems) == len(expect), problems
    for problem, (where, why) in zip(problems, expect):
        assert problem.startswith(where) and why in problem and "; " in problem, problem


@pytest.mark.parametrize("node, message", [
    ("Pad-reflect", "mode 'reflect'"), ("Slice-reverse", "steps by -1"),
    ("Concat-const", "with a constant tensor")])
def test_onnx_refusals_name_node_and_fix(node: str, message: str) -> None:
    from onnx import TensorProto, helper, numpy_helper
    ints = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = {"Pad-reflect": helper.make_node("Pad", ["x", "pads"], ["a"], name="p",
                                             mode="reflect"),
             "Slice-reverse": helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["a"],
                                               name="p"),
             "Concat-const": helper.make_node("Concat", ["x", "c"], ["a"], name="p", axis=1)}
    tail = [helper.make_node("Flatten", ["a"], ["b"], name="flat"),
            helper.make_node("Gemm", ["b", "fw"], ["y"], name="fc", transB=1)]
    width = {"Pad-reflect": 3 * 10 * 10, "Slice-reverse": 3 * 64, "Concat-const": 4 * 64}[node]
    inits = [ints("pads", [0, 0, 1, 1, 0, 0, 1, 1]), ints("st", [-1]), ints("en", [-100]),
             ints("ax", [3]), ints("sp", [-1]),
             numpy_helper.from_array(np.ones((2, 1, 8, 8), np.float32), "c"),
             numpy_helper.from_array(np.ones((3, width), np.float32), "fw")]
    g = helper.make_graph([nodes[node], *tail], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, *SHAPE])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    with pytest.raises(UnsupportedModelError, match=message) as err:
        onnx_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), SHAPE)
    assert err.value.problems[0].startswith(f"node p ({node.split('-')[0]})")


def test_onnx_attribute_forms_before_opset_10_and_11() -> None:
    """Slice (opset < 10) and Pad (opset < 11) hold their arguments as attributes."""
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Slice", ["x"], ["a"], name="s", starts=[1, 0], ends=[3, 7],
                              axes=[1, 3]),
             helper.make_node("Pad", ["a"], ["b"], name="p", pads=[0, 1, 2, 0, 0, 0, 1, 2]),
             helper.make_node("Flatten", ["b"], ["c"], name="flat"),
             helper.make_node("Gemm", ["c", "fw"], ["y"], name="fc", transB=1)]
    fw = np.random.default_rng(0).normal(size=(3, 3 * 11 * 9)).astype(np.float32)
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, *SHAPE])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], [numpy_helper.from_array(fw, "fw")])
    graph = onnx_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)]), SHAPE)
    x = torch.rand(4, *SHAPE)
    want = F.linear(F.pad(x[:, 1:3, :, :7], (0, 2, 2, 1, 1, 0)).flatten(1), torch.tensor(fw))
    assert (ann_forward(graph, x) - want).abs().max().item() <= 1e-5
    assert kinds(graph) == ["Input", "Slice", "Slice", "Pad", "Flatten", "Linear"]


# --------------------------------------------------------------------------- running them

def _rate_error(snn, graph, x: np.ndarray) -> float:
    """max |readout after T steps / T - ANN logits|, relative to max |logits|."""
    logits = ann_forward(graph, x, dtype=torch.float64)
    readout = run_network(snn, x, dtype=torch.float64).readout[-1] / snn.timesteps
    return float((readout - logits).abs().max() / logits.abs().max())


@pytest.mark.parametrize("case", sorted(RESIDUAL_MODELS))
def test_float_snn_rates_converge_to_the_ann(case: str) -> None:
    """Residual sums are aligned: the readout rate approaches the ANN's logits as 1/T."""
    graph = _graph(case)
    errors = [_rate_error(convert(graph, X, timesteps=t, threshold="max"), graph, X[:16])
              for t in (8, 64, 512)]
    assert errors[2] < 0.03 and errors[2] < errors[1] < errors[0], errors


@pytest.mark.parametrize("case", sorted(RESIDUAL_MODELS))
def test_residual_nets_quantize_for_loihi2_and_emulate_exactly(case: str) -> None:
    q = quantize(normalize(convert(_graph(case), X, timesteps=5)), get_target("loihi2"))
    assert validate(q, get_target("loihi2")) == []
    assert_matches_reference(q, X[:5], batch_size=2)  # every spike == sims.reference
    assert validate(q, get_target("loihi2-sim")) == []   # delays 0..63 on both targets
    delayed = {(name, d) for name, ds in synaptic_delays(q.layers).items() for d in ds if d}
    residual = {"identity", "option_a", "conv1x1", "span3", "dense"}
    assert bool(delayed) == (case in residual)  # inception's branches arrive together
    assert {d for _, d in delayed} == ({2} if case == "span3" else {1} if delayed else set())


@pytest.mark.lava
@pytest.mark.parametrize("case", sorted(RESIDUAL_MODELS))
def test_residual_nets_run_in_lava_spike_for_spike(case: str, tmp_path) -> None:
    """Identity, option-A and 1x1-conv shortcuts, a shortcut around 3 layers and two
    concatenations: converted, quantized for loihi2-sim, exported and run in real Lava;
    every spike and the readout equal the emulator's (shortcuts through DelaySparse)."""
    from exporters.netx import write_netx
    from sims.emulator import emulate
    from sims.verify import verify
    q = quantize(normalize(convert(_graph(case), X, timesteps=3)), get_target("loihi2-sim"))
    assert validate(q, get_target("loihi2-sim")) == []
    write_netx(q, tmp_path / "net.net")
    report = verify(q, str(tmp_path / "net.net"), X[:2])
    assert report["spike_mismatches"] == 0 and report["readout_mismatches"] == 0
    spikes = emulate(q, X[:2], record=True).spikes     # what was compared is not silent
    assert all(trains.any() for trains in spikes.values()), {
        name: float(trains.mean()) for name, trains in spikes.items()}
    delays = max(max(d) for d in synaptic_delays(q.layers).values())
    assert delays == {"span3": 2, "inception": 0}.get(case, 1)


def test_shortcut_longer_than_the_delay_range_is_a_violation() -> None:
    q = quantize(normalize(convert(_graph("span3"), X, timesteps=3)), get_target("loihi2"))
    short = dataclasses.replace(get_target("loihi2"), max_synaptic_delay=1)
    found = [v for v in validate(q, short) if v.quantity == "synaptic delay"]
    assert [(v.layer, v.value) for v in found] == [("body_3<-stem.1", 2)]
    assert "sources (stem.1 at depth 1, body_1 at depth 3)" in found[0].hint
    assert "shorten the shortcut so that it skips at most 2 layers" in found[0].hint


# --------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def option_a_files(tmp_path_factory) -> tuple[Path, str]:
    """The option-A net as TorchScript and data labelled by it (balanced by centring)."""
    root = tmp_path_factory.mktemp("option_a")
    make, shape = RESIDUAL_MODELS["option_a"]
    model = make()
    x = np.random.default_rng(1).random((360, *shape)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    y = (logits - logits.mean(0)).argmax(1).numpy()
    np.savez(root / "train.npz", x=x[:240], y=y[:240])
    np.savez(root / "test.npz", x=x[240:], y=y[240:])
    torch.jit.save(torch.jit.trace(model, torch.from_numpy(x[:2])), root / "model.pt")
    return root, f"npz:{root / 'train.npz'},{root / 'test.npz'}"


FAST = ["--timesteps", "4", "--calib-batches", "2", "--calib-batch-size", "48",
        "--iterations", "1", "--no-progress"]


@pytest.mark.parametrize("target", ["float", "loihi2"])
def test_cli_runs_option_a_resnet(option_a_files, target: str) -> None:
    root, data = option_a_files
    out = root / target
    assert main([str(root / "model.pt"), "--target", target, "--data", data,
                 "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["snn_accuracy"]) == {"none", "lp", "ftbc"}
    assert ("fixed_accuracy" in report) == (target == "loihi2")
    assert (out / "network.net").exists() == (target == "loihi2")


@pytest.mark.lava
def test_cli_loihi2_sim_runs_residuals_in_lava(option_a_files) -> None:
    """The option-A ResNet block end to end on loihi2-sim: its shortcut waits one step in a
    DelaySparse, and Lava equals the emulator spike for spike."""
    root, data = option_a_files
    out = root / "sim"
    assert main([str(root / "model.pt"), "--target", "loihi2-sim", "--data", data,
                 "--out", str(out), "--verify-samples", "3", "--verify-workers", "1",
                 *FAST]) == 0
    lava = json.loads((out / "report.json").read_text())["lava"]
    assert lava["samples"] == 3
    assert lava["spike_mismatches"] == 0 and lava["readout_mismatches"] == 0


def test_cli_refuses_a_delay_beyond_the_targets_range(option_a_files, capsys,
                                                      monkeypatch) -> None:
    """A shortcut longer than the target's synaptic delay field is exit 3, naming the
    synapse, the delay and the fix (here a target whose field holds 0 steps)."""
    import hw_targets.base
    root, data = option_a_files
    narrow = dataclasses.replace(get_target("loihi2-sim"), max_synaptic_delay=0)
    monkeypatch.setitem(hw_targets.base.TARGETS, "loihi2-sim", narrow)
    assert main([str(root / "model.pt"), "--target", "loihi2-sim", "--data", data,
                 "--out", str(root / "narrow"), *FAST]) == 3
    err = capsys.readouterr().err
    assert "layer body_2<-stem.1: synaptic delay = 1.0 exceeds 0 steps" in err
    assert "sources (stem.1 at depth 1, body at depth 2)" in err
    assert "use --target loihi2" in err
    assert not (root / "narrow" / "network.net").exists()