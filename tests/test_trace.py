"""toolchain.trace: the IR reproduces the model, from every front end; refusals are complete."""
from __future__ import annotations

import functools
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import InputError, UnsupportedModelError
from core.ir import (AddNode, AnnGraph, AvgPoolNode, InputNode, LinearNode,
                     ReluNode)
from tests.models import IMG, LAYER_CASES, WHOLE_MODELS, UnsupportedNet, head, randomize_bn
from toolchain.ann import ann_forward
from toolchain.data import load_data
from toolchain.load import LoadedModel, load_model
from toolchain.trace import trace

ROOT = Path(__file__).resolve().parents[1]
FORMS = ("module", "scripted", "traced", "export")
TOL = 1e-4


def as_form(model: nn.Module, shape: tuple[int, ...], form: str) -> LoadedModel:
    """``model`` as the loader would hand it over in ``form``."""
    x = torch.rand(2, *shape)
    obj = {"module": lambda: model,
           "scripted": lambda: torch.jit.script(model),
           "traced": lambda: torch.jit.trace(model, x, check_trace=False),
           "export": lambda: torch.export.export(model, (x,))}[form]()
    kind = {"scripted": "torchscript", "traced": "torchscript"}.get(form, form)
    return LoadedModel(kind, obj, Path(f"{form}.pt"))


@functools.lru_cache(maxsize=None)
def traced_case(case: str, form: str) -> AnnGraph:
    """The checked graph of a ``LAYER_CASES`` / ``WHOLE_MODELS`` case (traced once per run)."""
    make, shape = {**LAYER_CASES, **WHOLE_MODELS}[case]
    return assert_equivalent(make(), shape, form)


def assert_equivalent(model: nn.Module, shape: tuple[int, ...], form: str) -> AnnGraph:
    """Trace ``model`` in ``form`` and check the IR reproduces it within TOL."""
    graph = trace(as_form(model, shape, form), shape)
    x = torch.rand(5, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    got = ann_forward(graph, x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == len(names) and isinstance(graph.nodes[0], InputNode)
    assert isinstance(graph.node(graph.output), LinearNode)
    return graph


def kinds(graph) -> list[str]:
    return [type(n).__name__.removesuffix("Node") for n in graph.nodes]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_kinds(case: str, form: str) -> None:
    traced_case(case, form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(WHOLE_MODELS))
def test_whole_models(case: str, form: str) -> None:
    graph = traced_case(case, form)
    assert not any("BatchNorm" in n.name for n in graph.nodes)


def test_batchnorm_folded_into_conv_and_linear() -> None:
    graph = traced_case("conv_bn_relu", "module")
    assert kinds(graph) == ["Input", "Conv", "Relu", "Flatten", "Linear"]
    assert graph.nodes[1].name == "0.0" and "BatchNorm2d" in graph.nodes[1].origin
    assert kinds(traced_case("linear_bn1d_relu", "scripted")) == [
        "Input", "Linear", "Relu", "Linear"]


@pytest.mark.parametrize("case, clip", [("relu6", 6.0), ("hardtanh", 0.5), ("clamp_reshape", 2.0),
                                        ("clamp_min_max", 1.5), ("functional_relu_view", None)])
@pytest.mark.parametrize("form", ["module", "traced"])
def test_clipped_relus(case: str, clip: float | None, form: str) -> None:
    graph = traced_case(case, form)
    relus = [n for n in graph.nodes if isinstance(n, ReluNode)]
    assert len(relus) == 1 and relus[0].clip == clip


def test_pools_become_fixed_avgpool() -> None:
    pool = [n for n in traced_case("adaptive_avgpool", "scripted").nodes
            if isinstance(n, AvgPoolNode)]
    assert [(p.kernel, p.stride, p.padding) for p in pool] == [((2, 3), (2, 3), (0, 0))]
    graph = traced_case("mean_pool", "export")
    assert kinds(graph) == ["Input", "Conv", "Relu", "AvgPool", "Flatten", "Linear"]
    assert graph.nodes[3].kernel == (6, 6)


@pytest.mark.parametrize("case", ["normalized_sub_div", "normalized_mul_add"])
@pytest.mark.parametrize("form", FORMS)
def test_input_transform_recognised(case: str, form: str) -> None:
    graph = traced_case(case, form)
    assert kinds(graph) == ["Input", "Conv", "Relu", "Flatten", "Linear"]
    np.testing.assert_allclose(graph.input.mean, [0.2, 0.7], rtol=1e-6)
    np.testing.assert_allclose(graph.input.std, [0.5, 0.25], rtol=1e-6)
    assert graph.input.shape == IMG


@pytest.mark.parametrize("case", sorted(WHOLE_MODELS))
def test_decomposed_export_program(case: str, tmp_path: Path) -> None:
    """A core-aten ExportedProgram (convolution, addmm, native batch norm) saved as .pt2."""
    make, shape = WHOLE_MODELS[case]
    model = make()
    program = torch.export.export(model, (torch.rand(2, *shape),))
    unset = multiprocessing.get_start_method(allow_none=True) is None
    program = program.run_decompositions()
    if unset:  # run_decompositions fixes the start method; Lava's import must set it later
        multiprocessing.set_start_method(None, force=True)
    torch.export.save(program, str(tmp_path / "model.pt2"))
    graph = trace(load_model(tmp_path / "model.pt2"), shape)
    x = torch.rand(5, *shape)
    with torch.no_grad():
        assert (ann_forward(graph, x) - model(x)).abs().max().item() <= TOL
    assert [type(n) for n in graph.nodes] == [type(n) for n in traced_case(case, "module").nodes]


def test_plain_input_has_no_transform() -> None:
    graph = traced_case("conv", "module")
    assert graph.input.mean is None and graph.input.std is None


@pytest.mark.parametrize("form", FORMS)
def test_residual_structure(form: str) -> None:
    graph = traced_case("residual", form)
    adds = [n for n in graph.nodes if isinstance(n, AddNode)]
    assert [a.name for a in adds] == ["layer1.0", "layer1.1"]
    assert [len(a.inputs) for a in adds] == [2, 2]
    assert adds[0].inputs[1] == "stem.2"  # the skip connection
    assert "layer1.0.conv1" in [n.name for n in graph.nodes]
    assert graph.input.mean is not None


@pytest.mark.parametrize("form", FORMS)
def test_all_problems_in_one_error(form: str) -> None:
    with pytest.raises(UnsupportedModelError) as err:
        trace(as_form(UnsupportedNet().eval(), (1, 8, 8), form), (1, 8, 8))
    problems = err.value.problems
    assert len(problems) == 4, problems
    pool, bn, gate, norm = problems
    assert pool.startswith("pool (MaxPool2d)") and "replace MaxPool2d by AvgPool2d" in pool
    assert bn.startswith("bn (BatchNorm2d)") and "not preceded by a Conv2d or Linear" in bn
    assert gate.startswith("gate (Sigmoid)") and "replace it with ReLU" in gate
    assert norm.startswith("norm (LayerNorm)") and "BatchNorm right after" in norm
    assert err.value.exit_code == 2


class _Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.fc = nn.Linear(2 * 36, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.fn(x), 1))


REFUSED = {
    "ceil_mode": (lambda: head(nn.AvgPool2d(4, ceil_mode=True), IMG), "ceil_mode=True"),
    "count_include_pad": (lambda: head(nn.AvgPool2d(3, padding=1, count_include_pad=False),
                                       IMG), "count_include_pad=False"),
    "adaptive": (lambda: head(nn.AdaptiveAvgPool2d(4), IMG), r"maps \(6, 6\) to \(4, 4\)"),
    "bn_first": (lambda: randomize_bn(head(nn.BatchNorm2d(2), IMG)), "not preceded by"),
    "transposed": (lambda: head(nn.ConvTranspose2d(2, 2, 3), IMG), "transposed"),
    "leaky": (lambda: head(nn.LeakyReLU(), IMG), "negative rates"),
    "tanh_clip": (lambda: head(nn.Hardtanh(), IMG), r"clips to \[-1.0, 1.0\]"),
    "softmax_out": (lambda: nn.Sequential(head(nn.ReLU(), IMG), nn.Softmax(1)),
                    "softmax normalises"),
    "product": (lambda: _Functional(lambda x: x * torch.relu(x)), "multiplies two activations"),
    "stack": (lambda: _Functional(lambda x: torch.stack([x, x], 1).sum(1)),
              r"stack stacks activations along a new axis.*torch.cat\(..., dim=1\)"),
    "pad_reflect": (lambda: _Functional(lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")
                                        [:, :, 1:-1, 1:-1]), "mode 'reflect'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusals_name_layer_and_fix(case: str) -> None:
    make, message = REFUSED[case]
    with pytest.raises(UnsupportedModelError, match=message) as err:
        trace(as_form(make().eval(), IMG, "module"), IMG)
    assert all(";" in p for p in err.value.problems)


def test_output_must_be_linear() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 3), nn.ReLU()).eval()
    with pytest.raises(UnsupportedModelError, match="not produced by a Linear layer"):
        trace(as_form(model, IMG, "scripted"), IMG)


def test_wrong_input_shape_is_input_error() -> None:
    make, shape = LAYER_CASES["conv"]
    for form in ("module", "scripted", "export"):
        with pytest.raises(InputError):
            trace(as_form(make(), shape, form), (3, 6, 6))


def test_digits_example_traces_at_full_accuracy() -> None:
    loaded = load_model(ROOT / "examples" / "digits_cnn.pt")
    graph = trace(loaded, (1, 8, 8))
    data = load_data("digits")
    x = torch.from_numpy(np.array(data.x_test))
    with torch.no_grad():
        want = loaded.obj(x)
    got = ann_forward(graph, x)
    assert (got - want).abs().max().item() <= TOL
    assert (got.argmax(1).numpy() == data.y_test).mean() >= 0.95
    assert sum(isinstance(n, ReluNode) for n in graph.nodes) >= 4
    assert kinds(graph).count("Conv") == 3 and graph.input.mean is not None
