"""The code's shape: docs/architecture.md matches the modules, imports point one way, modules stay small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "pipeline"
MAX_LINES = 400
RAY_MODULES = {"pipeline.ray_session", "pipeline.load_stage", "pipeline.load_dataset",
               "pipeline.load_tasks", "pipeline.load_waves", "pipeline.send_stage",
               "pipeline.ledger_stage", "pipeline.actors", "pipeline.metrics"}


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(modules of the package it imports, top-level third-party names it imports)."""
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            else:
                outside.add(base.split(".")[0])
            for alias in node.names:
                for candidate in (f"{base}.{alias.name}", base):
                    if candidate in known and candidate != name:
                        inside.add(candidate)
                        break
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    inside.add(alias.name)
                outside.add(alias.name.split(".")[0])
    return inside, outside - {"pipeline"}


def documented() -> dict[str, set[str]]:
    rows = {}
    for line in (ROOT / "docs/architecture.md").read_text().splitlines():
        m = re.match(r"\| `(pipeline/[\w/]+\.py)` \|[^|]*\|([^|]*)\|$", line)
        if m:
            name = m.group(1).removesuffix(".py").replace("/", ".").removesuffix(".__init__")
            allowed = {f"pipeline.{a.strip()}" for a in m.group(2).split(",") if a.strip()}
            rows[name] = allowed
    return rows


def test_architecture_page_lists_exactly_the_modules() -> None:
    assert set(documented()) == set(modules())


def test_each_module_imports_only_what_the_page_allows() -> None:
    known = modules()
    rows = documented()
    for name, path in known.items():
        inside, _ = imports(name, path, known)
        extra = inside - rows[name]
        assert not extra, f"{name} imports {sorted(extra)}, which docs/architecture.md does not allow"


def test_no_import_circle() -> None:
    known = modules()
    graph = {n: imports(n, p, known)[0] for n, p in known.items()}
    # A package's __init__ may import its own members (it chooses the implementation).
    for n in graph:
        if known[n].name == "__init__.py":
            graph[n] = {d for d in graph[n] if not d.startswith(n + ".")}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for d in graph[n]:
            if state.get(d) == 1:
                raise AssertionError("import circle: " + " -> ".join(path + [d]))
            if d not in state:
                visit(d, path + [d])
        state[n] = 2
    for n in graph:
        if n not in state:
            visit(n, [n])


def test_only_the_ray_modules_import_ray_and_the_product_never_imports_the_lab() -> None:
    known = modules()
    for name, path in known.items():
        inside, outside = imports(name, path, known)
        if name not in RAY_MODULES:
            assert "ray" not in outside, f"{name} imports ray"
        if not name.startswith("pipeline.lab"):
            assert not any(d.startswith("pipeline.lab") for d in inside), name
            assert "aiosmtpd" not in outside, name


def test_no_module_is_over_the_limit_and_campaign_reads_in_one_page() -> None:
    for name, path in modules().items():
        assert len(path.read_text().splitlines()) <= MAX_LINES, name
    assert len((PACKAGE / "campaign.py").read_text().splitlines()) < 250


def _runtime_closure(dist: str) -> set[str]:
    """Every distribution that installing `dist` (no extras) pulls in, from installed metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [(dist, frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, extras) in {(s, frozenset()) for s in seen} and not extras:
            continue
        seen.add(key)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            env = {"extra": ""}
            if req.marker is not None and not any(
                    req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return seen


def test_runtime_dependencies_leave_the_lab_and_the_tests_out() -> None:
    closure = _runtime_closure("bulkmail")
    assert "ray" in closure and "polars" in closure  # the walk does follow requirements
    for lab in ("aiosmtpd", "email-validator", "psutil", "moto", "pytest"):
        assert lab not in closure, lab
