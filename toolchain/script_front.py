"""The TorchScript front end: the inlined graph (``torch._C._jit_pass_inline``), interpreted node
by node: ``prim::GetAttr`` chains resolve to parameters and buffers, ``prim::If`` /
``prim::Loop`` run the branch their (constant) condition picks, every other op is run on the
example batch and handed to ``Builder.call`` (``toolchain.builder``)."""
from __future__ import annotations

import operator
import re
from typing import Any, Callable, Iterable

import torch

from core.errors import InputError
from core.ir import AnnGraph
from toolchain.builder import (EXAMPLE_BATCH, Act, Builder, Op, Scope, canonical, examples,
                               has_act, leaves, run_example)

_PY_OPS: dict[str, Callable[..., Any]] = {
    "aten::len": len, "aten::__getitem__": operator.getitem, "aten::eq": operator.eq,
    "aten::ne": operator.ne, "aten::lt": operator.lt, "aten::le": operator.le,
    "aten::gt": operator.gt, "aten::ge": operator.ge, "aten::add": operator.add,
    "aten::sub": operator.sub, "aten::mul": operator.mul, "aten::floordiv": operator.floordiv,
    "aten::neg": operator.neg, "aten::__not__": operator.not_, "aten::__and__": operator.and_,
    "aten::__or__": operator.or_, "aten::__is__": operator.is_, "aten::__isnot__":
    operator.is_not, "aten::Int": int, "aten::Float": float, "aten::Bool": bool,
    "aten::format": lambda fmt, *a: fmt.format(*a), "aten::warn": lambda *a: None,
    "prim::unchecked_cast": lambda v: v, "prim::Uninitialized": lambda: None,
    "prim::dtype": lambda t: t.dtype, "prim::device": lambda t: t.device,
    "prim::NumToTensor": torch.tensor, "aten::dim": lambda t: t.dim(),
}


def _script_scope(node: torch._C.Node) -> Scope:
    """Module path and class from the inlined call hierarchy ("features(Sequential).0(Conv2d)")."""
    parts = [(n, c) for n, c in re.findall(r"([\w$]+)\(([\w$]+)\)", node.getModuleHierarchy())
             if n not in ("SELF", "UNKNOWN_INSTANCE")]
    source = re.findall(r"([^/\s]+\.py):(\d+)", str(node.sourceRange()) or "")
    where = f"{source[0][0]}:{source[0][1]}" if source else ""
    return Scope(".".join(n for n, _ in parts), parts[-1][1] if parts else "", where)


def _script_exec(node: torch._C.Node, args: list) -> Any:
    """Run a TorchScript op on (example) values."""
    kind, values = node.kind(), examples(args)
    if kind in _PY_OPS and not any(isinstance(v, torch.Tensor) for v in leaves(values)):
        return _PY_OPS[kind](*values)
    schema = torch._C.parse_schema(node.schema())
    ns, name = schema.name.split("::")
    fn = getattr(getattr(getattr(torch.ops, ns), name), schema.overload_name or "default")
    pos = [v for v, a in zip(values, schema.arguments) if not a.kwarg_only]
    kw = {a.name: v for v, a in zip(values, schema.arguments) if a.kwarg_only}
    return fn(*pos, **kw)


def _bind_all(node: torch._C.Node, env: dict, values: list) -> None:
    for out, value in zip(node.outputs(), values):
        env[out.unique()] = value


def _bind(node: torch._C.Node, env: dict, result: Any) -> None:
    """Bind an op's result: the value itself for one output, its items for several."""
    _bind_all(node, env, [result] if node.outputsSize() == 1 else list(result))


def _poison_outputs(b: Builder, node: torch._C.Node, env: dict, why: str, fix: str) -> None:
    """Record a problem at ``node`` and mark its outputs as unknown."""
    if why:
        b.problem(_script_scope(node).path or "forward()", why, fix)
    _bind_all(node, env, [Act(None, None)] * node.outputsSize())


def _script_op(b: Builder, node: torch._C.Node, env: dict) -> None:
    args = [env[v.unique()] for v in node.inputs()]
    if any(isinstance(a, Act) and a.example is None for a in leaves(args)):
        return _poison_outputs(b, node, env, "", "")
    if node.schema() == "(no schema)" and node.kind() not in _PY_OPS:
        return _poison_outputs(b, node, env, f"{node.kind()} is not understood by the tracer",
                               "use standard modules, or save the model with torch.export")
    out = run_example(lambda: _script_exec(node, args), node.kind())
    kind = node.kind()
    value = b.call(Op(canonical(kind), tuple(args), out, _script_scope(node)))
    if kind != canonical(kind) and isinstance(args[0], Act):
        env[node.inputsAt(0).unique()] = value  # in-place: the argument now holds the result
    _bind(node, env, value)


def _script_block(b: Builder, block: Any, env: dict, inputs: list) -> list:
    """Run a sub-block with its parameters bound to ``inputs``; return its outputs."""
    for param, value in zip(block.inputs(), inputs):
        env[param.unique()] = value
    _script_nodes(b, block.nodes(), env)
    return [env[v.unique()] for v in block.outputs()]


def _prim_if(b: Builder, node: torch._C.Node, env: dict) -> None:
    cond = env[node.inputsAt(0).unique()]
    if isinstance(cond, Act):
        return _poison_outputs(b, node, env, "prim::If branches on activation values",
                               "remove data-dependent control flow")
    blocks = list(node.blocks())
    _bind_all(node, env, _script_block(b, blocks[0 if cond else 1], env, []))


def _prim_loop(b: Builder, node: torch._C.Node, env: dict) -> None:
    trips, cond, *carried = [env[v.unique()] for v in node.inputs()]
    if has_act([trips, cond]):
        return _poison_outputs(b, node, env, "prim::Loop depends on activation values",
                               "remove data-dependent loops")
    block, i = next(iter(node.blocks())), 0
    while cond and i < trips:
        cond, *carried = _script_block(b, block, env, [i, *carried])
        i += 1
    _bind_all(node, env, carried)


def _prim_raise(b: Builder, node: torch._C.Node, env: dict) -> None:
    msg = env[node.inputsAt(0).unique()]
    raise InputError(f"the model raised an error on its example input: {msg} "
                     "(is the input shape right?)")


def _prim_const(b: Builder, node: torch._C.Node, env: dict) -> None:
    try:
        env[node.output().unique()] = node.output().toIValue()
    except RuntimeError:  # function constants (e.g. the name of an inlined callee)
        env[node.output().unique()] = None


def _prim_getattr(b: Builder, node: torch._C.Node, env: dict) -> None:
    owner = env[node.inputsAt(0).unique()]
    env[node.output().unique()] = getattr(owner, node.s("name"))


def _prim_values(fn: Callable[[list], Any]) -> Callable[[Builder, Any, dict], None]:
    def run(b: Builder, node: torch._C.Node, env: dict) -> None:
        _bind(node, env, fn([env[v.unique()] for v in node.inputs()]))
    return run


_PRIMS: dict[str, Callable[[Builder, Any, dict], None]] = {
    "prim::Constant": _prim_const, "prim::GetAttr": _prim_getattr, "prim::If": _prim_if,
    "prim::Loop": _prim_loop, "prim::RaiseException": _prim_raise,
    "prim::ListConstruct": _prim_values(list), "prim::TupleConstruct": _prim_values(tuple),
    "prim::ListUnpack": _prim_values(lambda v: list(v[0])),
    "prim::TupleUnpack": _prim_values(lambda v: list(v[0])),
    "prim::TupleIndex": _prim_values(lambda v: v[0][v[1]]),
}


def _script_nodes(b: Builder, nodes: Iterable, env: dict) -> None:
    for node in nodes:
        _PRIMS.get(node.kind(), _script_op)(b, node, env)


def _trace_script(module: torch.jit.ScriptModule, example: torch.Tensor,
                  origin: str) -> AnnGraph:
    graph = module.graph.copy()
    torch._C._jit_pass_inline(graph)
    inputs = list(graph.inputs())
    if len(inputs) != 2:
        raise InputError(f"the TorchScript forward() takes {len(inputs) - 1} inputs; ftbc "
                         "needs exactly one input tensor")
    b = Builder(example, origin)
    env = {inputs[0].unique(): module, inputs[1].unique(): b.input_act()}
    _script_nodes(b, graph.nodes(), env)
    return b.finish([env[v.unique()] for v in graph.outputs()])


def front_torchscript(module: Any, shape: tuple[int, ...], origin: str) -> AnnGraph:
    return _trace_script(module, torch.rand(EXAMPLE_BATCH, *shape), origin)
