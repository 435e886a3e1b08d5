"""Which keyword arguments a constructor really accepts, read from its signature and source.

TerraTorch's constructors pass `**kwargs` down a chain (`prithvi_eo_tiny` -> `_create_prithvi` ->
`PrithviViT.__init__`, which swallows what is left): a typo'd key is ignored silently (`img_sz` trains a
224 px model) or fails deep inside the build. `kwargs_of` follows each `**kwargs` with `ast` into the calls
it is forwarded to, down to closed signatures; nothing is imported beyond the object, called or built.
"""
from __future__ import annotations

import ast
import builtins
import difflib
import inspect
import textwrap
from typing import Any, Callable

_SKIP = ("self", "cls")


class Accepted:
    """The keyword names a constructor accepts; `closed` is False when some `**kwargs` could not be followed
    (then nothing is refused); `forced` names are overwritten by the constructor itself; `defaults` the
    first default seen for each name."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.forced: set[str] = set()
        self.defaults: dict[str, Any] = {}
        self.closed = True


def _target(obj: Any) -> Callable | None:
    obj = inspect.unwrap(obj)
    if inspect.isclass(obj):
        init = obj.__init__
        return None if init is object.__init__ else init
    return obj if callable(obj) else None


def _func_node(fn: Callable) -> ast.FunctionDef | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    return next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and n.name == fn.__name__), None)


def _resolve(expr: ast.expr, fn: Callable, body: ast.FunctionDef, owner: type | None) -> list[Any] | None:
    """What a called expression names: globals, `module.attr`, `super().__init__`, or a local variable
    assigned from any of those (`cls = A if x else B` patterns become every assigned candidate)."""
    scope = {**vars(builtins), **getattr(fn, "__globals__", {})}
    if isinstance(expr, ast.Name):
        assigned = [n.value for n in _walk(body) if isinstance(n, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == expr.id for t in n.targets)]
        if assigned:
            found = [_resolve(v, fn, body, owner) for v in assigned]
            return None if any(f is None for f in found) else [x for f in found for x in f]
        return [scope[expr.id]] if expr.id in scope else None
    if isinstance(expr, ast.Attribute):
        if (isinstance(expr.value, ast.Call) and isinstance(expr.value.func, ast.Name)
                and expr.value.func.id == "super" and owner is not None):
            mro = owner.__mro__
            return [getattr(mro[1], expr.attr)] if len(mro) > 1 and hasattr(mro[1], expr.attr) else None
        base = _resolve(expr.value, fn, body, owner)
        if base and len(base) == 1 and hasattr(base[0], expr.attr):
            return [getattr(base[0], expr.attr)]
    return None


def _walk(fn_node: ast.FunctionDef):
    """ast.walk of a function body without nested functions/classes (their own `**kwargs` are not ours)."""
    todo = list(fn_node.body)
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node)
                    if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)))


def _const_keys(node: ast.expr) -> set[str] | None:
    """Keys of `dict({...})` / `{...}` literal forwarded with `**`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and node.args:
        node = node.args[0]
    if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
        return {k.value for k in node.keys}
    return None


def kwargs_of(obj: Any, _depth: int = 0, _seen: frozenset = frozenset()) -> Accepted:
    """Keyword names `obj` (a function or class) accepts, following `**kwargs` through the calls it is
    forwarded to (reads the source with `ast`; nothing is called or built)."""
    out = Accepted()
    fn = _target(obj)
    if fn is None or _depth > 6 or fn in _seen:
        out.closed = fn is None and inspect.isclass(obj)
        return out
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        out.closed = False
        return out
    var_kw = None
    for name, p in params.items():
        if p.kind == p.VAR_KEYWORD:
            var_kw = name
        elif p.kind != p.VAR_POSITIONAL and name not in _SKIP:
            out.names.add(name)
            if p.default is not p.empty:
                out.defaults.setdefault(name, p.default)
    if var_kw is None:
        return out
    body = _func_node(fn)
    if body is None:
        out.closed = False
        return out
    owner = obj if inspect.isclass(obj) else None
    aliases, understood = {var_kw}, set()
    for n in _walk(body):  # `x.update(kwargs)`, `x = kwargs`, `x = dict(kwargs)`: x carries the user's kwargs
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "update"
                and isinstance(n.func.value, ast.Name) and any(isinstance(a, ast.Name) and a.id == var_kw
                                                               for a in n.args)):
            aliases.add(n.func.value.id)
            understood.update(id(a) for a in n.args)
    for n in _walk(body):
        if isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == var_kw \
                and isinstance(n.slice, ast.Constant):
            # a key the function writes into the kwargs it forwards overwrites the user's value, unless it is
            # one of its own parameters (`kwargs["num_frames"] = num_frames` passes the user's value on)
            if not isinstance(n.ctx, ast.Store):
                out.names.add(n.slice.value)
            elif n.slice.value not in params:
                out.forced.add(n.slice.value)
            understood.add(id(n.value))
        elif (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
              and n.func.value.id == var_kw and n.func.attr in ("pop", "get", "setdefault") and n.args
              and isinstance(n.args[0], ast.Constant)):
            out.names.add(n.args[0].value)
            understood.add(id(n.func.value))
        elif isinstance(n, ast.Compare) and isinstance(n.left, ast.Constant) and len(n.comparators) == 1 \
                and isinstance(n.comparators[0], ast.Name) and n.comparators[0].id == var_kw:
            out.names.add(n.left.value)
            understood.add(id(n.comparators[0]))
        elif isinstance(n, ast.Call) and any(k.arg is None and isinstance(k.value, ast.Name)
                                             and k.value.id in aliases for k in n.keywords):
            understood.update(id(k.value) for k in n.keywords if k.arg is None)
            fixed = {k.arg for k in n.keywords if k.arg is not None}
            for k in n.keywords:
                if k.arg is None and not (isinstance(k.value, ast.Name) and k.value.id in aliases):
                    keys = _const_keys(k.value)
                    if keys is None:
                        out.closed = False
                    fixed |= keys or set()
            callees = _resolve(n.func, fn, body, owner)
            if callees is None:
                out.closed = False
                continue
            for callee in callees:
                sub = kwargs_of(callee, _depth + 1, _seen | {fn})
                positional = [p for p in positional_names(callee)][:len(n.args)]
                out.names |= sub.names - fixed - set(positional)
                out.forced |= sub.forced
                for k, v in sub.defaults.items():
                    out.defaults.setdefault(k, v)
                out.closed &= sub.closed
    # any other use of the kwargs dict (passed positionally, stored, returned) cannot be followed
    if any(isinstance(n, ast.Name) and n.id == var_kw and id(n) not in understood for n in _walk(body)):
        out.closed = False
    out.names -= out.forced
    return out


def positional_names(obj: Any) -> list[str]:
    fn = _target(obj)
    try:
        params = inspect.signature(fn).parameters if fn else {}
    except (TypeError, ValueError):
        return []
    return [n for n, p in params.items() if n not in _SKIP and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def unknown_keys(given: dict[str, Any], valid: set[str], key: str, forced: set[str] = frozenset(),
                 owner: str = "") -> list[str]:
    """One issue per key of `given` not in `valid`, naming the nearest valid key."""
    issues = []
    for k in given:
        if k in forced and k not in valid:
            issues.append(f"{key}.{k}: {owner} sets it itself (from its other arguments); remove it")
        elif k not in valid:
            near = difflib.get_close_matches(str(k), sorted(valid), n=1, cutoff=0.6)
            issues.append(f"{key}.{k}: not an argument of {owner}; " + (
                f"did you mean '{key}.{near[0]}'?" if near else f"valid: {', '.join(sorted(valid))}"))
    return issues
