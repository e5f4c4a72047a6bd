"""The ``torch.export`` front end: Python modules (and state_dicts + arch) are exported, then
``ExportedProgram``s are walked one fx node per aten op, each op run on the example batch and
handed to ``Builder.call`` (``toolchain.builder``)."""
from __future__ import annotations

import operator
import re
from typing import Any

import torch

from core.errors import InputError, UnsupportedModelError
from core.ir import AnnGraph
from toolchain.builder import (EXAMPLE_BATCH, Act, Builder, Op, Scope, canonical, examples,
                               run_example)


def _export_scope(node: torch.fx.Node) -> Scope:
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = next(reversed(stack.values()), ("", ""))
    cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    trace = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    where = f"{trace[-1][0].rsplit('/', 1)[-1]}:{trace[-1][1]}" if trace else ""
    return Scope(path, cls.rsplit(".", 1)[-1] if path else "", where)


def _schema_args(target: Any, args: tuple, kwargs: dict) -> tuple:
    """fx args + kwargs in schema order, defaults filled in."""
    schema = target._schema
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(args) and not arg.kwarg_only:
            out.append(args[i])
        elif arg.name in kwargs:
            out.append(kwargs[arg.name])
        else:
            out.append(arg.default_value if arg.has_default_value() else None)
    return tuple(out)


def _export_call(b: Builder, node: torch.fx.Node, env: dict) -> Any:
    args = torch.fx.node.map_arg(node.args, lambda n: env[n.name])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name])
    if node.target is operator.getitem and not isinstance(args[0], Act):
        return args[0][args[1]]
    out = run_example(lambda: node.target(*examples(args), **examples(kwargs)), node.name)
    if isinstance(node.target, torch._ops.OpOverload):
        raw = node.target._schema.name
        value = b.call(Op(canonical(raw), _schema_args(node.target, args, kwargs), out,
                          _export_scope(node)))
        if raw != canonical(raw) and isinstance(node.args[0], torch.fx.Node):
            env[node.args[0].name] = value  # in-place: the argument now holds the result
        return value
    name = getattr(node.target, "__name__", str(node.target))
    return b.call(Op(name, tuple(args), out, _export_scope(node)))


def _trace_export(program: torch.export.ExportedProgram, example: torch.Tensor,
                  origin: str) -> AnnGraph:
    sig = program.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **sig.inputs_to_lifted_tensor_constants}
    values = {**program.state_dict, **program.constants}
    b, env = Builder(example, origin), {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = (values[names[node.name]].detach() if node.name in names
                              else b.input_act())
        elif node.op == "get_attr":
            env[node.name] = getattr(program.graph_module, node.target)
        elif node.op == "call_function":
            env[node.name] = _export_call(b, node, env)
        elif node.op == "output":
            return b.finish(torch.fx.node.map_arg(node.args[0], lambda n: env[n.name]))
    raise InputError("exported program has no output")


def _export_example(program: torch.export.ExportedProgram, shape: tuple) -> torch.Tensor:
    """A zero example batch matching the program's (static) input shape."""
    user = [n for n in program.graph.nodes if n.op == "placeholder"
            and n.name in program.graph_signature.user_inputs]
    if len(user) != 1:
        raise InputError(f"the exported program takes {len(user)} inputs; ftbc needs exactly "
                         "one input tensor")
    fixed = tuple(_concrete_dim(program, d) for d in user[0].meta["val"].shape)
    if fixed[1:] != tuple(shape):
        raise InputError(f"the exported program was exported for input {fixed}, not "
                         f"(N, {', '.join(map(str, shape))}): pass data of shape {fixed[1:]}, or "
                         "export the model again for the data's shape")
    return torch.rand(fixed)


def _concrete_dim(program: torch.export.ExportedProgram, dim: Any) -> int:
    """A dimension of the program's input as an int: a dynamic one (a SymInt, e.g. an
    exported dynamic batch) becomes its example size at export time, else the smallest
    size its range allows."""
    if isinstance(dim, int):
        return dim
    node = getattr(dim, "node", None)
    if getattr(node, "hint", None) is not None:
        return int(node.hint)
    bounds = program.range_constraints.get(getattr(node, "expr", None))
    return int(bounds.lower) if bounds is not None else 1


def _export_module(module: torch.nn.Module, example: torch.Tensor) -> Any:
    run_example(lambda: module(example), "forward()")
    try:
        return torch.export.export(module, (example,))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnsupportedModelError([
            f"{type(module).__name__}.forward: torch.export cannot capture it ({first}); "
            "remove data-dependent Python control flow, or save it with torch.jit.script"]
        ) from None


def front_export(program: Any, shape: tuple[int, ...], origin: str) -> AnnGraph:
    return _trace_export(program, _export_example(program, shape), origin)


def front_module(module: Any, shape: tuple[int, ...], origin: str) -> AnnGraph:
    example = torch.rand(EXAMPLE_BATCH, *shape)
    return _trace_export(_export_module(module.eval(), example), example, origin)
