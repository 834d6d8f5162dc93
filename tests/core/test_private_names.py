"""No module outside the seam reaches into a library's internals.

gateway/dataplane/fast/ is the seam: the only package allowed to use what uvicorn, aiohttp,
httptools, httpx, redis and starlette keep to themselves. Everywhere else, every module under
gateway/ is read with `ast` and must not:
- import a private module or name of those libraries: a path component or a name that starts
  with `_`, or a module they do not offer as API (`INTERNAL_MODULES`);
- read or write a private attribute (`_name`, not `__dunder__`) of an object that statically
  comes from them: a module or name imported from them, what calling or reading an attribute
  of one returns, a variable or `self` attribute annotated with or assigned one, `getattr` and
  `setattr` with a constant private name, and `self._name` in a subclass of one of their
  classes where the library defines `_name`.

The walk counts the uses inside the seam too, so the report shows where the fragile part is
and how big it is; only the count outside must be 0.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
SEAM = GATEWAY / "dataplane" / "fast"
LIBRARIES = frozenset({"uvicorn", "aiohttp", "httpx", "httptools", "redis", "starlette"})
# Modules with no underscore that are still not API: the parts a library builds its public
# objects from. A module under one of these is internal too.
INTERNAL_MODULES = (
    "uvicorn.protocols",
    "aiohttp.client_proto",
    "aiohttp.client_reqrep",
    "aiohttp.connector",
    "aiohttp.http_exceptions",
    "aiohttp.http_parser",
    "aiohttp.http_writer",
    "redis._parsers",
)
ATTRIBUTE_FUNCTIONS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


@dataclass(frozen=True, slots=True)
class Use:
    line: int
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}"


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def internal_module(path: str) -> bool:
    parts = path.split(".")
    if parts[0] not in LIBRARIES:
        return False
    return any(private(p) for p in parts) or any(
        path == m or path.startswith(m + ".") for m in INTERNAL_MODULES
    )


class _Walker(ast.NodeVisitor):
    """Finds the uses in one module. `bound` maps each local name known to hold a library
    object to the library path it came from; a scope starts from its enclosing scope's."""

    def __init__(self, constants: dict[str, str]) -> None:
        self.uses: list[Use] = []
        self.constants = constants  # module-level string constants, for getattr(x, NAME)
        self.bound: dict[str, str] = {}
        self.self_attrs: set[str] = set()  # `self.x` attributes holding library objects
        self.inherited: set[str] = set()  # private names of the library classes `self` is

    # --- what holds a library object -------------------------------------------------------

    def origin(self, node: ast.expr | None) -> str | None:
        """The library path `node` evaluates to something from, or None."""
        if isinstance(node, ast.Name):
            return self.bound.get(node.id)
        if isinstance(node, ast.Attribute):
            if _is_self(node.value) and node.attr in self.self_attrs:
                return "self." + node.attr
            base = self.origin(node.value)
            return None if base is None else f"{base}.{node.attr}"
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id == "super" and self.inherited:
                return "super()"
            base = self.origin(node.func)
            return None if base is None else f"{base}()"
        if isinstance(node, ast.Await | ast.Subscript | ast.Starred):
            return self.origin(node.value)
        return None

    def annotated(self, annotation: ast.expr | None) -> str | None:
        """The library a type annotation names, if it names one (`x: Connection | None`)."""
        if annotation is None:
            return None
        for sub in ast.walk(annotation):
            if isinstance(sub, ast.Name) and sub.id in self.bound:
                return self.bound[sub.id]
            if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                head = sub.value.split(".")[0].split("[")[0].strip()
                if head in self.bound:
                    return self.bound[head]
        return None

    def bind(self, target: ast.expr, source: str | None) -> None:
        if source is None:
            return
        if isinstance(target, ast.Name):
            self.bound[target.id] = source
        elif isinstance(target, ast.Attribute) and _is_self(target.value):
            self.self_attrs.add(target.attr)
        elif isinstance(target, ast.Tuple | ast.List):
            for element in target.elts:
                self.bind(element, source)

    # --- imports ---------------------------------------------------------------------------

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] not in LIBRARIES:
                continue
            if internal_module(alias.name):
                self.uses.append(Use(node.lineno, f"import {alias.name}"))
            if alias.asname:
                self.bound[alias.asname] = alias.name
            else:
                root = alias.name.split(".")[0]
                self.bound[root] = root

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level or module.split(".")[0] not in LIBRARIES:
            return
        for alias in node.names:
            path = f"{module}.{alias.name}"
            if internal_module(module) or private(alias.name):
                self.uses.append(Use(node.lineno, f"from {module} import {alias.name}"))
            self.bound[alias.asname or alias.name] = path

    # --- bindings --------------------------------------------------------------------------

    def visit_Assign(self, node: ast.Assign) -> None:
        self.generic_visit(node)
        value = node.value
        for target in node.targets:
            if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
                for element, part in zip(target.elts, value.elts, strict=False):
                    self.bind(element, self.origin(part))
            else:
                self.bind(target, self.origin(value))

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.generic_visit(node)
        self.bind(node.target, self.annotated(node.annotation) or self.origin(node.value))

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.bind(node.target, self.origin(node.iter))
        self.generic_visit(node)

    visit_AsyncFor = visit_For

    def visit_With(self, node: ast.With | ast.AsyncWith) -> None:
        for item in node.items:
            if item.optional_vars is not None:
                self.bind(item.optional_vars, self.origin(item.context_expr))
        self.generic_visit(node)

    visit_AsyncWith = visit_With

    # --- scopes ----------------------------------------------------------------------------

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        outer = dict(self.bound)
        arguments = node.args
        for arg in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]:
            self.bind(ast.Name(arg.arg), self.annotated(arg.annotation))
        for first in (True, False):  # twice: a name bound late in a loop is used early in it
            found = len(self.uses)
            for statement in node.body:
                self.visit(statement)
            if first:
                del self.uses[found:]
        self.bound = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for decorator in node.decorator_list:
            self.visit(decorator)
        outer = (dict(self.bound), set(self.self_attrs), set(self.inherited))
        bases = [self.origin(base) for base in node.bases]
        self.inherited = set().union(*(_library_privates(b) for b in bases if b is not None))
        self.self_attrs = set()
        for method in node.body:  # what `self.x` holds, from every method, before the uses
            collector = _Walker(self.constants)
            collector.bound = dict(self.bound)
            collector.inherited = self.inherited
            collector.visit(method)
            self.self_attrs |= collector.self_attrs
        for statement in node.body:
            self.visit(statement)
        self.bound, self.self_attrs, self.inherited = outer

    # --- the uses --------------------------------------------------------------------------

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        if not private(node.attr):
            path = self.origin(node)
            if path is not None and internal_module(path) and not _inner(node, self):
                self.uses.append(Use(node.lineno, f"{ast.unparse(node)} (an internal module)"))
            return
        if _is_self(node.value) and node.attr in self.inherited:
            self.uses.append(Use(node.lineno, f"{ast.unparse(node)} (the library's own)"))
        elif self.origin(node.value) is not None:
            self.uses.append(Use(node.lineno, ast.unparse(node)))

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        func = node.func
        if not (isinstance(func, ast.Name) and func.id in ATTRIBUTE_FUNCTIONS):
            return
        if len(node.args) < 2:
            return
        name = node.args[1]
        text = (
            name.value
            if isinstance(name, ast.Constant) and isinstance(name.value, str)
            else self.constants.get(name.id)
            if isinstance(name, ast.Name)
            else None
        )
        if text is None or not private(text):
            return
        target = node.args[0]
        if self.origin(target) is not None or (_is_self(target) and text in self.inherited):
            self.uses.append(Use(node.lineno, ast.unparse(node)))


def _is_self(node: ast.expr) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


def _inner(node: ast.Attribute, walker: _Walker) -> bool:
    """Whether the internal module was already reached by `node.value` (counted there)."""
    inner = walker.origin(node.value)
    return inner is not None and internal_module(inner)


def _library_privates(path: str) -> set[str]:
    """The private names a library class and its library ancestors define or set on `self`."""
    module_path, _, name = path.rstrip("()").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError, ValueError):
        return set()
    if not inspect.isclass(cls):
        return set()
    names: set[str] = set()
    for ancestor in inspect.getmro(cls):
        if ancestor.__module__.split(".")[0] not in LIBRARIES:
            continue
        names.update(n for n in vars(ancestor) if private(n))
        names.update(n for n in getattr(ancestor, "__slots__", ()) if private(n))
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(ancestor)))
        except (OSError, TypeError, SyntaxError):
            continue  # compiled: its slots and members above are what it has
        names.update(
            sub.attr
            for sub in ast.walk(tree)
            if isinstance(sub, ast.Attribute) and _is_self(sub.value) and private(sub.attr)
        )
    return names


def uses_in(source: str) -> list[Use]:
    tree = ast.parse(source)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    walker = _Walker(constants)
    walker.visit(tree)
    return sorted(set(walker.uses), key=lambda use: use.line)


def modules() -> Iterator[Path]:
    yield from sorted(GATEWAY.rglob("*.py"))


def in_seam(path: Path) -> bool:
    return path.is_relative_to(SEAM)


def test_no_module_outside_the_seam_uses_a_private_name_of_a_library() -> None:
    outside: dict[str, list[Use]] = {}
    inside: dict[str, list[Use]] = {}
    for path in modules():
        found = uses_in(path.read_text())
        if found:
            where = inside if in_seam(path) else outside
            where[str(path.relative_to(GATEWAY.parent))] = found
    count_in = sum(len(u) for u in inside.values())
    count_out = sum(len(u) for u in outside.values())
    print(f"private uses of {', '.join(sorted(LIBRARIES))}: {count_out} outside the seam")
    print(f"{count_in} inside it (gateway/dataplane/fast/):")
    for module, found in inside.items():
        print(f"  {module}: {len(found)}")
        for use in found:
            print(f"    {use}")
    assert not outside, "\n".join(
        f"{module}: {use}" for module, found in outside.items() for use in found
    )


def test_the_walk_finds_each_kind_of_private_use() -> None:
    """A known answer: each kind the walk looks for, once, and uses that are not private."""
    source = textwrap.dedent(
        """
        import aiohttp
        import uvicorn.protocols.http.h11_impl
        import redis._parsers as parsers
        from aiohttp.client_proto import ResponseHandler
        from httpx import _config
        from starlette.requests import Request
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        PARSER = "_parser"

        class Mine(HttpToolsProtocol):
            def data_received(self, data: bytes) -> None:
                self._own = 1
                self.transport.write(data)
                self._unset_keepalive_if_required()

        async def f(session: aiohttp.ClientSession, request: Request, n: int) -> None:
            session._connector.close()
            response = await session.get("http://x")
            response._body = b""
            n._fine = 1
            getattr(response.connection, PARSER)
            aiohttp.__version__
            for chunk in request.stream():
                chunk._x
        """
    )
    found = [use.what for use in uses_in(source)]
    assert found == [
        "import uvicorn.protocols.http.h11_impl",
        "import redis._parsers",
        "from aiohttp.client_proto import ResponseHandler",
        "from httpx import _config",
        "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol",
        "self._unset_keepalive_if_required (the library's own)",
        "session._connector",
        "response._body",
        "getattr(response.connection, PARSER)",
        "chunk._x",
    ], found
