"""Trace a loaded model into an ``AnnGraph``: three front ends, one table of op handlers.

Front ends walk a graph and call ``Builder.call(Op)`` for every operation
(``toolchain.builder``: the builder and the op handlers), one per kind of loaded model:

* Python modules (and state_dicts + arch) and ``ExportedProgram``s: ``torch.export`` graph,
  one fx node per aten op (``toolchain.export_front``);
* TorchScript: the inlined graph, interpreted node by node (``toolchain.script_front``);
* ONNX ``ModelProto``s: ``toolchain.onnx_front``, whose ``onnx::<OpType>`` handlers restate
  each node as the equivalent aten op and call that op's handler.

QCFS activations are matched by ``toolchain.qcfs``, imported here: it wraps the affine and
clamp handlers of ``toolchain.builder`` before any front end runs.

Every op that cannot become integrate-and-fire neurons is recorded (module path, class, why,
what to do) and tracing goes on, so one ``UnsupportedModelError`` lists them all.
"""
from __future__ import annotations

from typing import Any, Callable

from core.ir import AnnGraph
from toolchain import qcfs  # noqa: F401  (registers the QCFS handlers, wrapping the builder's)
from toolchain.export_front import front_export, front_module
from toolchain.load import LoadedModel
from toolchain.script_front import front_torchscript

FrontEnd = Callable[[Any, tuple[int, ...], str], AnnGraph]


def _front_onnx(model: Any, shape: tuple[int, ...], origin: str) -> AnnGraph:
    from toolchain.onnx_front import trace_onnx  # imports onnx: loaded on first use
    return trace_onnx(model, shape, origin)


FRONT_ENDS: dict[str, FrontEnd] = {"torchscript": front_torchscript, "export": front_export,
                                   "module": front_module, "onnx": _front_onnx}


def trace(model: LoadedModel, input_shape: tuple[int, ...]) -> AnnGraph:
    """The model as an ``AnnGraph``; ``input_shape`` excludes the batch axis. Raises
    ``UnsupportedModelError`` listing every op that cannot be converted, ``InputError`` when
    the model does not run on that shape."""
    shape = tuple(int(s) for s in input_shape)
    origin = f"{model.path.name if model.path else 'model'} ({model.kind})"
    return FRONT_ENDS[model.kind](model.obj, shape, origin)
