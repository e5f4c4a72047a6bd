"""toolchain.onnx_front: ONNX models give the same IR as the PyTorch path; refusals complete.

Models are exported with the TorchScript-based ``torch.onnx.export(..., dynamo=False)``: the
dynamo exporter needs onnxscript, which is not a dependency.
"""
from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from core.errors import InputError, UnsupportedModelError
from core.ir import AddNode, LinearNode, ReluNode
from tests.models import IMG, LAYER_CASES, WHOLE_MODELS, UnsupportedNet
from toolchain.ann import ann_accuracy, ann_forward
from toolchain.cli import main
from toolchain.data import load_data
from toolchain.load import LoadedModel, load_model
from toolchain.trace import trace

ROOT = Path(__file__).resolve().parents[1]
DIGITS_MODEL = ROOT / "examples" / "digits_cnn.pt"
TOL = 1e-5
CASES = {**LAYER_CASES, **WHOLE_MODELS}
BN_CASES = ["conv_bn_relu", "conv_nobias_bn", "linear_bn1d_relu", "small_cnn", "residual"]


def to_onnx(model: nn.Module, shape: tuple[int, ...], **options) -> onnx.ModelProto:
    """``model`` exported to ONNX (dynamic batch unless ``fixed_batch``)."""
    fixed = options.pop("fixed_batch", False)
    dynamic = {} if fixed else {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.rand(2, *shape),), buf, dynamo=False,
                          input_names=["x"], output_names=["y"], **dynamic, **options)
    return onnx.load_from_string(buf.getvalue())


def onnx_graph(proto: onnx.ModelProto, shape: tuple[int, ...]):
    return trace(LoadedModel("onnx", proto, Path("model.onnx")), shape)


@functools.lru_cache(maxsize=None)
def torch_graph(case: str):
    make, shape = CASES[case]
    return trace(LoadedModel("module", make(), Path("model.pt")), shape)


def kinds(graph) -> list[str]:
    return [type(n).__name__.removesuffix("Node") for n in graph.nodes]


def assert_same(graph, ref, shape: tuple[int, ...]) -> None:
    """Same node kinds and count, same outputs (within TOL) as the PyTorch path's graph."""
    assert kinds(graph) == kinds(ref)
    x = torch.rand(7, *shape, generator=torch.Generator().manual_seed(3))
    assert (ann_forward(graph, x) - ann_forward(ref, x)).abs().max().item() <= TOL
    if ref.input.mean is None:
        assert graph.input.mean is None and graph.input.std is None
    else:
        np.testing.assert_allclose(graph.input.mean, ref.input.mean, rtol=1e-6)
        np.testing.assert_allclose(graph.input.std, ref.input.std, rtol=1e-6)
    clips = [n.clip for n in graph.nodes if isinstance(n, ReluNode)]
    assert clips == pytest.approx([n.clip for n in ref.nodes if isinstance(n, ReluNode)])


# --------------------------------------------------------------------------- same IR

@pytest.mark.parametrize("case", sorted(CASES))
def test_same_graph_as_pytorch_path(case: str) -> None:
    make, shape = CASES[case]
    assert_same(onnx_graph(to_onnx(make(), shape), shape), torch_graph(case), shape)


@pytest.mark.parametrize("case", BN_CASES)
def test_batchnorm_nodes_folded(case: str) -> None:
    """Without the exporter's constant folding the file holds BatchNormalization nodes."""
    make, shape = CASES[case]
    proto = to_onnx(make(), shape, do_constant_folding=False, fixed_batch=True)
    assert "BatchNormalization" in {n.op_type for n in proto.graph.node}
    graph = onnx_graph(proto, shape)
    assert_same(graph, torch_graph(case), shape)
    assert any("(BatchNormalization)" in n.origin for n in graph.nodes)


@pytest.mark.parametrize("case, clip", [("relu6", 6.0), ("hardtanh", 0.5),
                                        ("clamp_min_max", 1.5)])
@pytest.mark.parametrize("opset", [10, 17])
def test_clip_from_attributes_and_inputs(case: str, clip: float, opset: int) -> None:
    """Opset 10 Clip has min/max attributes, later ones constant inputs."""
    make, shape = CASES[case]
    graph = onnx_graph(to_onnx(make(), shape, opset_version=opset), shape)
    assert [n.clip for n in graph.nodes if isinstance(n, ReluNode)] == [clip]
    assert_same(graph, torch_graph(case), shape)


def test_names_follow_module_paths() -> None:
    make, shape = CASES["residual"]
    graph = onnx_graph(to_onnx(make(), shape), shape)
    adds = [n for n in graph.nodes if isinstance(n, AddNode)]
    assert [a.name for a in adds] == ["layer1.0", "layer1.1"]
    assert adds[0].inputs[1] == "stem.2"  # the skip connection
    assert [n.name for n in graph.nodes if n.name != "Flatten"] == [
        n.name for n in torch_graph("residual").nodes if n.name != "flatten"]
    assert graph.node("layer1.0.conv1").origin == "node /layer1/layer1.0/conv1/Conv (Conv)"


# --------------------------------------------------------------------------- hand-built graphs

def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _hand_model(opset: int = 13) -> onnx.ModelProto:
    """Operators torch.onnx does not emit for the test models: Gemm with transB=0 and
    alpha/beta, MatMul + Add, Dropout (with mask), Identity, GlobalAveragePool, Clip with only
    a min, AveragePool with count_include_pad, Sub/Div of constants at the start."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["a"], name="norm/Sub"),
        helper.make_node("Div", ["a", "std"], ["b"], name="norm/Div"),
        helper.make_node("Conv", ["b", "w1"], ["c"], name="conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c", "zero"], ["d"], name="act/Clip"),
        helper.make_node("AveragePool", ["d"], ["e"], name="pool/AveragePool",
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("Dropout", ["e", "ratio", "training"], ["f", "mask"], name="drop"),
        helper.make_node("Identity", ["f"], ["g"], name="id"),
        helper.make_node("Conv", ["g", "w2", "b2"], ["h"], name="conv2/Conv",
                         auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["h"], ["i"], name="act2/Relu"),
        helper.make_node("GlobalAveragePool", ["i"], ["j"], name="gap"),
        helper.make_node("Flatten", ["j"], ["k"], name="flat", axis=1),
        helper.make_node("MatMul", ["k", "w3"], ["l"], name="fc1/MatMul"),
        helper.make_node("Add", ["l", "b3"], ["m"], name="fc1/Add"),
        helper.make_node("Relu", ["m"], ["n"], name="act3/Relu"),
        helper.make_node("Gemm", ["n", "w4", "b4"], ["y"], name="fc2/Gemm",
                         alpha=0.5, beta=2.0, transB=0),
    ]
    inits = [_init("mean", [[[0.1]], [[0.4]]]), _init("std", [[[0.5]], [[2.0]]]),
             _init("w1", rng.normal(size=(4, 2, 3, 3))), _init("zero", 0.0),
             _init("ratio", 0.3), numpy_helper.from_array(np.array(False), "training"),
             _init("w2", rng.normal(size=(6, 4, 3, 3))), _init("b2", rng.normal(size=6)),
             _init("w3", rng.normal(size=(6, 5))), _init("b3", rng.normal(size=5)),
             _init("w4", rng.normal(size=(5, 3))), _init("b4", rng.normal(size=(1, 3)))]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *IMG])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def test_hand_built_graph_matches_onnx_reference() -> None:
    model = _hand_model()
    graph = onnx_graph(model, IMG)
    assert kinds(graph) == ["Input", "Conv", "Relu", "AvgPool", "Conv", "Relu", "AvgPool",
                            "Flatten", "Linear", "Relu", "Linear"]
    np.testing.assert_allclose(graph.input.mean, [0.1, 0.4])
    np.testing.assert_allclose(graph.input.std, [0.5, 2.0])
    x = np.random.default_rng(1).random((5, *IMG)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(ann_forward(graph, x).numpy(), want, atol=1e-5)


def test_gemm_transposed_weight() -> None:
    """transB=1 (torch's Linear) and transB=0 give the same LinearNode."""
    w, b = np.arange(12.0).reshape(3, 4) / 10, np.array([0.5, -1.0, 2.0])
    graphs = []
    for trans_b, weight in ((1, w), (0, w.T)):
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b,
                                alpha=2.0)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [2, 4])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [2, 3])], [_init("w", weight), _init("b", b)])
        graphs.append(onnx_graph(helper.make_model(g), (4,)))
    for graph in graphs:
        fc = graph.node(graph.output)
        assert isinstance(fc, LinearNode)
        np.testing.assert_allclose(fc.weight, 2 * w, rtol=1e-6)
        np.testing.assert_allclose(fc.bias, b, rtol=1e-6)


# --------------------------------------------------------------------------- refusals

def test_all_problems_in_one_error() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        onnx_graph(to_onnx(UnsupportedNet().eval(), (1, 8, 8), do_constant_folding=False),
                   (1, 8, 8))
    problems = err.value.problems
    assert len(problems) == 4, problems
    pool, bn, gate, norm = problems
    assert pool.startswith("node /pool/MaxPool (MaxPool): MaxPool takes a maximum")
    assert "replace MaxPool2d by AvgPool2d" in pool
    assert bn.startswith("node /bn/BatchNormalization (BatchNormalization)")
    assert "not preceded by a Conv2d or Linear" in bn
    assert gate.startswith("node /gate/Sigmoid (Sigmoid)") and "replace it with ReLU" in gate
    assert norm.startswith("node /norm/LayerNormalization (LayerNormalization)")
    assert "BatchNorm right after" in norm
    assert all(";" in p for p in problems) and err.value.exit_code == 2


def _chain(*nodes: onnx.NodeProto, inits=(), opsets=(("", 13),)) -> onnx.ModelProto:
    g = helper.make_graph(list(nodes), "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, *IMG])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid(*o) for o in opsets])


def test_unknown_domain_and_asymmetric_pads_reported_together() -> None:
    rng = np.random.default_rng(0)
    model = _chain(
        helper.make_node("Conv", ["x", "w"], ["a"], name="c", pads=[0, 0, 1, 1]),
        helper.make_node("FancyAct", ["a"], ["b"], name="custom", domain="com.example"),
        helper.make_node("LeakyRelu", ["b"], ["c2"], name="leaky"),
        helper.make_node("Flatten", ["c2"], ["d"], name="flat"),
        helper.make_node("Gemm", ["d", "fw"], ["y"], name="fc", transB=1),
        inits=[_init("w", rng.normal(size=(2, 2, 3, 3))), _init("fw", rng.normal(size=(3, 50)))],
        opsets=(("", 13), ("com.example", 1)))
    with pytest.raises(UnsupportedModelError) as err:
        onnx_graph(model, IMG)
    problems = err.value.problems
    assert len(problems) == 2, problems  # LeakyRelu is downstream of the unknown op
    assert problems[0].startswith("node c (Conv): Conv pads asymmetrically")
    assert problems[1].startswith("node custom (FancyAct): FancyAct (domain com.example)")


@pytest.mark.parametrize("node, width, message", [
    (helper.make_node("Mul", ["x", "x"], ["a"], name="sq"), 2, "multiplies two activations"),
    (helper.make_node("Clip", ["x", "lo"], ["a"], name="cl"), 2, r"clips to \[-1.0, None\]"),
    (helper.make_node("AveragePool", ["x"], ["a"], name="p", kernel_shape=[3, 3],
                      pads=[1, 1, 1, 1]), 2, "count_include_pad=False"),
    (helper.make_node("Concat", ["x", "x"], ["a"], name="cat", axis=0), 2, "batch axis"),
    (helper.make_node("Pad", ["x", "pads", "half"], ["a"], name="pad"), 4,
     "pads with the constant 0.5"),
])
def test_refusals_name_node_and_fix(node: onnx.NodeProto, width: int, message: str) -> None:
    tail = [helper.make_node("Flatten", ["a"], ["b"], name="flat"),
            helper.make_node("Gemm", ["b", "fw"], ["y"], name="fc", transB=1)]
    pads = numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64), "pads")
    model = _chain(node, *tail, inits=[_init("lo", -1.0), _init("fw", np.ones((3, width * 36))),
                                       pads, _init("half", 0.5)])
    with pytest.raises(UnsupportedModelError, match=message) as err:
        onnx_graph(model, IMG)
    assert err.value.problems[0].startswith(f"node {node.name} ({node.op_type})")


def test_gemm_transposed_activation_refused() -> None:
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [2, 3])], [_init("w", np.ones((4, 3)))])
    with pytest.raises(UnsupportedModelError, match="transA=1"):
        onnx_graph(helper.make_model(g), (2,))


def test_wrong_input_shape_is_input_error() -> None:
    make, shape = CASES["conv"]
    with pytest.raises(InputError, match=r"is \(2, 2, 6, 6\), not \(N, 3, 6, 6\)"):
        onnx_graph(to_onnx(make(), shape, fixed_batch=True), (3, 6, 6))


# --------------------------------------------------------------------------- files, CLI, digits

def test_load_onnx_files(tmp_path: Path) -> None:
    make, shape = CASES["residual"]
    data = to_onnx(make(), shape).SerializeToString()
    named, unnamed = tmp_path / "m.onnx", tmp_path / "m.bin"
    named.write_bytes(data)
    unnamed.write_bytes(data)  # recognised by content
    for path in (named, unnamed):
        loaded = load_model(path)
        assert loaded.kind == "onnx" and isinstance(loaded.obj, onnx.ModelProto)
        assert_same(trace(loaded, shape), torch_graph("residual"), shape)


@pytest.mark.parametrize("how", ["truncated", "empty", "flipped", "text"])
def test_damaged_onnx_is_one_line_input_error(tmp_path: Path, how: str) -> None:
    make, shape = CASES["conv"]
    data = bytearray(to_onnx(make(), shape).SerializeToString())
    mid = len(data) // 2
    damaged = {"truncated": bytes(data[:mid]), "empty": b"",
               "flipped": bytes(data[:10]) + bytes(b ^ 0xFF for b in data[10:40]) + data[40:],
               "text": b"hello, I am not a model\n"}[how]
    path = tmp_path / "bad.onnx"
    path.write_bytes(damaged)
    with pytest.raises(InputError, match="ONNX") as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_cli_reports_unsupported_onnx_with_exit_2(tmp_path: Path, capsys) -> None:
    path = tmp_path / "unsupported.onnx"
    onnx.save(to_onnx(UnsupportedNet().eval(), (1, 8, 8)), str(path))
    assert main([str(path), "--data", "digits", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "node /pool/MaxPool (MaxPool)" in err and "node /gate/Sigmoid (Sigmoid)" in err


def test_digits_onnx_same_accuracy_as_torchscript(tmp_path: Path) -> None:
    scripted = load_model(DIGITS_MODEL)
    path = tmp_path / "digits.onnx"
    onnx.save(to_onnx(scripted.obj, (1, 8, 8)), str(path))
    data = load_data("digits")
    ref, graph = trace(scripted, (1, 8, 8)), trace(load_model(path), (1, 8, 8))
    assert kinds(graph) == kinds(ref)
    x = np.array(data.x_test)
    assert (ann_forward(graph, x) - ann_forward(ref, x)).abs().max().item() <= TOL
    accuracy = ann_accuracy(graph, data.x_test, data.y_test)
    assert accuracy == ann_accuracy(ref, data.x_test, data.y_test) and accuracy >= 95.0
