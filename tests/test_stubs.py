"""The type stubs against the built extensions, so that they cannot drift: every function, class,
method and property of batchnorm._C (and batchnorm._jax where built) is in its .pyi and the
other way round, with the same parameters: names, kinds (pybind11's unnamed `argN` parameters
are positional-only, `/` in the stub; `*` makes keyword-only) and defaults. The signatures come
from pybind11's docstrings, the stubs are read with ast."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import pytest

import batchnorm

# The stubs being edited (a source checkout) where present, else the installed ones.
SOURCE = Path(__file__).resolve().parents[1] / "python" / "batchnorm"
PACKAGE = SOURCE if (SOURCE / "_C.pyi").is_file() else Path(batchnorm.__file__).parent


class Param(NamedTuple):
    name: str
    kind: str  # "positional-only", "positional-or-keyword", "keyword-only"
    default: Optional[str]  # source text of the default, "..." where the stub leaves it out, None if none


def split_top_level(text: str) -> List[str]:
    """`text` split on the commas outside brackets and quotes."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    return parts + [tail] if tail else parts


def binding_params(obj, name: str, method: bool) -> List[Param]:
    """The parameters pybind11 wrote into `obj`'s docstring: `name(a: T, b: T = default) -> R`."""
    doc = obj.__doc__ or ""
    assert "Overloaded function" not in doc, f"{name}: overloads are not described by the stub check"
    m = re.match(rf"{re.escape(name)}\((.*)\) -> ", doc.splitlines()[0] if doc else "")
    assert m, f"{name}: no pybind11 signature in its docstring: {doc[:80]!r}"
    params, kind = [], None
    for part in split_top_level(m.group(1)):
        if part == "*":
            kind = "keyword-only"
            continue
        head, _, default = part.partition(" = ")
        pname = head.split(":")[0].strip()
        if method and not params and pname == "self":
            params.append(None)  # dropped below
            continue
        if kind == "keyword-only":
            k = kind
        else:  # pybind11 names unnamed arguments argN; they cannot be passed by keyword
            k = "positional-only" if re.fullmatch(r"arg\d+", pname) else "positional-or-keyword"
        params.append(Param(pname, k, default.strip() or None))
    return [p for p in params if p is not None]


def stub_params(fn: ast.FunctionDef, method: bool) -> List[Param]:
    a = fn.args
    positional = [(p, "positional-only") for p in a.posonlyargs] + [(p, "positional-or-keyword") for p in a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = [Param(p.arg, k, None if d is None else ast.unparse(d)) for (p, k), d in zip(positional, defaults)]
    params += [Param(p.arg, "keyword-only", None if d is None else ast.unparse(d))
               for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    assert a.vararg is None and a.kwarg is None, f"{fn.name}: *args/**kwargs in the stub hide the signature"
    return params[1:] if method else params


def same_default(stub: Optional[str], binding: Optional[str]) -> bool:
    if stub is None or binding is None:
        return stub is None and binding is None
    if stub == "...":
        return True
    try:
        return ast.literal_eval(stub) == ast.literal_eval(binding)
    except ValueError:
        return stub == binding


def compare(where: str, stub: List[Param], binding: List[Param]) -> List[str]:
    problems = []
    if len(stub) != len(binding):
        return [f"{where}: stub has {len(stub)} parameters {[p.name for p in stub]}, "
                f"the module {len(binding)} {[p.name for p in binding]}"]
    unnamed = [s.name for s, b in zip(stub, binding) if b.kind == "positional-only" != s.kind]
    if unnamed:  # one line for the usual drift: a binding without py::arg names
        problems.append(f"{where}: parameters {unnamed} have no py::arg name in the module (positional-only):"
                        " mark them with `/` in the stub")
    for s, b in zip(stub, binding):
        if s.kind != b.kind:
            if b.kind != "positional-only":
                problems.append(f"{where}: parameter {s.name!r} is {s.kind} in the stub, {b.kind} in the module")
        elif b.kind != "positional-only" and s.name != b.name:
            problems.append(f"{where}: parameter {s.name!r} in the stub is {b.name!r} in the module")
        if not same_default(s.default, b.default):
            problems.append(f"{where}: parameter {b.name!r} defaults to {s.default} in the stub, "
                            f"{b.default} in the module")
    return problems


def stub_definitions(tree: ast.Module) -> Dict[str, ast.AST]:
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def is_property(fn: ast.FunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)


def check_class(name: str, cls, node: ast.ClassDef) -> List[str]:
    problems = []
    members = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    built = {m for m in vars(cls) if not m.startswith("_pybind11_") and (not m.startswith("__") or m in members)}
    # Members pybind11 adds to every class (__init__ of a class without constructor, __module__,
    # __doc__ ...) are compared only where the stub names them; everything else must match.
    built -= {"__doc__", "__module__", "__dict__", "__weakref__"}
    if "__init__" not in members and (cls.__init__.__doc__ or "").startswith("__init__(self: "):
        problems.append(f"{name}.__init__ is bound but missing from the stub")
    for member in sorted(built | set(members)):
        where = f"{name}.{member}"
        if member not in members:
            problems.append(f"{where} is in the module but not in the stub")
            continue
        if member not in built and not hasattr(cls, member):
            problems.append(f"{where} is in the stub but not in the module")
            continue
        attr = vars(cls).get(member, getattr(cls, member))
        if isinstance(attr, property):
            if not is_property(members[member]):
                problems.append(f"{where} is a property in the module but a method in the stub")
            continue
        if is_property(members[member]):
            problems.append(f"{where} is a method in the module but a property in the stub")
            continue
        problems += compare(where, stub_params(members[member], True), binding_params(attr, member, True))
    return problems


def check_module(module_name: str, stub_path: Path) -> List[str]:
    module = importlib.import_module(module_name)
    defs = stub_definitions(ast.parse(stub_path.read_text()))
    built = {n for n in vars(module) if not n.startswith("__")}
    problems = [f"{module_name}.{n} is in the stub but not in the module" for n in sorted(set(defs) - built)]
    for n in sorted(built):
        obj = getattr(module, n)
        if n not in defs:
            problems.append(f"{module_name}.{n} is in the module but not in the stub")
        elif isinstance(obj, type):
            problems += check_class(f"{module_name}.{n}", obj, defs[n])
        else:
            assert isinstance(defs[n], ast.FunctionDef), f"{n}: a function in the module, a class in the stub"
            problems += compare(f"{module_name}.{n}", stub_params(defs[n], False), binding_params(obj, n, False))
    return problems


def test_c_stub_matches_the_module():
    problems = check_module("batchnorm._C", PACKAGE / "_C.pyi")
    assert not problems, "python/batchnorm/_C.pyi drifted from the module:\n" + "\n".join(problems)


def test_jax_stub_matches_the_module():
    try:
        importlib.import_module("batchnorm._jax")
    except ImportError as e:
        pytest.skip(f"batchnorm._jax is not built here ({e})")
    problems = check_module("batchnorm._jax", PACKAGE / "_jax.pyi")
    assert not problems, "python/batchnorm/_jax.pyi drifted from the module:\n" + "\n".join(problems)


def test_the_check_sees_drift(tmp_path):
    """The comparison itself: a renamed parameter, a dropped default, a missing function, a
    keyword parameter where the binding has none, a missing constructor and property, and an
    extra stub entry are all reported."""
    stub = (PACKAGE / "_C.pyi").read_text()
    drifted = (stub.replace("def device_of(obj: Any, name: str = \"array\")", "def device_of(obj: Any, label: str)")
               .replace("def get_num_threads() -> int: ...\n", "")
               .replace("def statistics(x: Any, axis: int, wide: bool, call: Call, /)",
                        "def statistics(x: Any, axis: int, wide: bool, call: Call)")
               .replace("    def __init__(self, stream: int, as_numpy: bool, stream_owner: Any = None) -> None: ...\n", "")
               .replace("    @property\n    def dtype(self) -> str: ...\n", "")
               + "\ndef no_such_function() -> None: ...\n")
    assert drifted.count("def ") == stub.count("def ") - 2  # three removed, one added: the edits applied
    path = tmp_path / "_C.pyi"
    path.write_text(drifted)
    problems = "\n".join(check_module("batchnorm._C", path))
    for expected in ("device_of: parameter 'label' in the stub is 'name'",
                     "device_of: parameter 'name' defaults to None in the stub, 'array' in the module",
                     "get_num_threads is in the module but not in the stub",
                     "statistics: parameters ['x', 'axis', 'wide', 'call'] have no py::arg name",
                     "no_such_function is in the stub but not in the module",
                     "Call.__init__ is bound but missing from the stub",
                     "Buffer.dtype is in the module but not in the stub"):
        assert expected in problems, f"not reported: {expected}\n{problems}"
