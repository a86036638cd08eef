"""The package layout is the architecture: each part imports only the parts below it.

The imports are read from the source (every ``import`` statement, wherever it
stands, except those under ``if TYPE_CHECKING:``, which only annotations see),
and checked against the one table below. The domain package is also imported
in a fresh interpreter to show it loads no Twisted I/O, Autobahn or
txredisapi module at all.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import securepub

PACKAGE = Path(securepub.__file__).parent

#: For each part, the parts its modules may import (its own included). The
#: modules at the top of the tree (the composition root ``node``, the twistd
#: glue ``tap`` and the public client import paths) may import every part.
ALLOWED = {
    "core": {"core"},
    "ops": {"core", "ops"},
    "engines": {"core", "ops", "engines"},
    "broker": {"core", "ops", "broker"},
    "server": {"core", "ops", "engines", "broker", "server"},
    "dev": {"core", "ops", "server", "dev"},
    "clients": {"core", "dev", "clients"},
}
TOP_LEVEL = {"__init__", "node", "tap", "client", "client_twisted"}

#: What the domain must never load: Twisted's I/O and web layers, Autobahn, Redis.
FORBIDDEN_IN_CORE = ("twisted.internet", "twisted.web", "autobahn", "txredisapi")


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(("securepub", *parts)), path


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports at run time, as absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base)
                name = f"{prefix}.{node.module}" if node.module else prefix
            else:
                name = node.module or ""
            found.add(name)
            # "from securepub.core import jsonstrict" imports a module too.
            found.update(f"{name}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def part_of(module: str) -> str | None:
    """The part (``core``, ``server``, ...) a securepub module belongs to; None at the top."""
    parts = module.split(".")
    if len(parts) < 2 or not (PACKAGE / parts[1]).is_dir():
        return None
    return parts[1]


def existing(module: str) -> str | None:
    """The securepub module (or package) a dotted name refers to, if it is one."""
    parts = module.split(".")
    while len(parts) > 1:
        candidate = PACKAGE.joinpath(*parts[1:])
        if candidate.with_suffix(".py").exists() or (candidate / "__init__.py").exists():
            return ".".join(parts)
        parts = parts[:-1]
    return None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for module, path in modules():
        targets = set()
        for name in imports(path, module):
            if name == "securepub" or name.startswith("securepub."):
                target = existing(name)
                if target is not None and target != module:
                    targets.add(target)
        edges[module] = targets
    return edges


def test_every_module_is_in_a_part_or_at_the_top() -> None:
    """No module lives outside the parts of the table, except the composition root."""
    for module, _ in modules():
        part = part_of(module)
        if part is None:
            assert module.split(".")[1] in TOP_LEVEL, f"{module} belongs in a part"
        else:
            assert part in ALLOWED, f"{module} is in an unknown part {part!r}"


def test_no_part_imports_upward() -> None:
    """Each part imports only itself and the parts below it; core imports no other part."""
    problems = []
    for module, targets in graph().items():
        part = part_of(module)
        if part is None:
            continue
        for target in targets:
            other = part_of(target)
            if other is None:
                if target != "securepub":
                    problems.append(f"{module} imports the top-level {target}")
            elif other not in ALLOWED[part]:
                problems.append(f"{module} ({part}) imports {target} ({other})")
    assert not problems, "\n".join(sorted(problems))


def test_no_module_import_cycle() -> None:
    """The module import graph has no cycle."""
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycle = [*stack[stack.index(target) :], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                walk(target)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            walk(module)


def test_core_imports_no_io_library_in_its_source() -> None:
    """No module of the domain imports Twisted's internet or web layers, Autobahn or txredisapi."""
    problems = []
    for module, path in modules():
        if part_of(module) != "core":
            continue
        for name in imports(path, module):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN_IN_CORE):
                problems.append(f"{module} imports {name}")
    assert not problems, "\n".join(problems)


def test_importing_core_loads_no_io_library() -> None:
    """In a fresh interpreter, importing every core module leaves the forbidden ones unloaded."""
    names = [module for module, _ in modules() if part_of(module) == "core"]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env, timeout=60
    )
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == b or m.startswith(b + ".") for b in FORBIDDEN_IN_CORE)]
    assert not bad, bad


def test_public_import_paths_keep_working() -> None:
    """What users write keeps working: securepub.client and securepub.client_twisted."""
    from securepub.client import APIError, Publisher
    from securepub.client_twisted import Subscriber, TwistedPublisher
    from securepub.clients import blocking, twisted_client

    assert Publisher is blocking.Publisher and APIError is blocking.APIError
    assert TwistedPublisher is twisted_client.TwistedPublisher
    assert Subscriber is twisted_client.Subscriber
