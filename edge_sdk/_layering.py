"""The import layering of edge_sdk, checked: `python -m edge_sdk._layering` prints the graph, fails on a back-arrow.

Why a check and not a convention: the code grew by accretion and the arrows went both ways (host build code
imported the device benchmark, core ``smoke.py`` imported the agent). A device installs ``edge-sdk[agent]`` and must
never pull the converter stack; a fleet host must not depend on a CLI. Those rules only hold if a test fails the
moment an import points the wrong way, so this module reads every product module with :mod:`ast` (nothing is
imported or executed) and checks each import against the layers below.

Layers, lowest first (an import may only point to its own layer or a lower one)::

    core ← runtimes ← {targets | benchmark} ← {converters | agent} ← fleet ← {testing | pipeline} ← cli

Layers in braces are siblings: they share a rank and must not import each other (the agent never imports the
converters and the converters never import the agent). Three placements are decisions, not givens:

* ``targets`` (device profiles, the bundle compatibility check, Edge TPU ops) reads only core and is used by the
  converters' build step and the CLI. It sits above ``runtimes`` so that its runtime list may derive from the
  runtime registry, and below the converters that use it.
* ``benchmark`` (with its worker) measures runtimes on host and device alike; ``edge-sdk build`` (in the
  converters) benchmarks its candidates to choose one, and the agent does not use it. So it is a shared tool
  above ``runtimes``, beside ``targets``, below the converters -- not their sibling.
* ``testing`` (the fleet harness: simulated devices, MQTT pool, broker) is below ``cli`` because ``edge-sdk fleet
  simulate`` ships the simulator as a demo command; the harness never imports the CLI (tests drive the CLI as a
  child process).

What counts as an import: module-level imports, function-level (lazy) imports -- heavy dependencies are imported
lazily, so the lazy ones are most of the real arrows --, imports under ``if TYPE_CHECKING:`` (a type that names a
higher layer is the same design dependency even if it costs nothing at run time) and ``importlib.import_module``
with a literal ``"edge_sdk..."`` name. Running a module as a child process (``python -m edge_sdk._bench_worker``)
is not an import and is not checked. A module that no layer claims fails the check too, so a new module has to be
placed here on purpose; so does an import of an ``edge_sdk`` module that does not exist (a stale path after a move).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ALLOWED",
    "LAYERS",
    "Edge",
    "Layer",
    "Report",
    "check",
    "default_roots",
    "discover",
    "layer_of",
    "main",
    "parse_imports",
]


@dataclass(frozen=True)
class Layer:
    """One layer: modules whose dotted name is, or is below, one of ``prefixes``; ``rank`` orders the layers.

    ``exact`` names modules claimed without their subtree (the root package ``edge_sdk``, which would otherwise
    claim everything).
    """

    name: str
    rank: int
    prefixes: tuple[str, ...]
    exact: tuple[str, ...] = ()


#: The product's small shared modules everyone may use. Listed one by one (no ``edge_sdk.*`` catch-all) so a new
#: top-level module has to be placed.
CORE_MODULES: tuple[str, ...] = (
    "edge_sdk._deps",
    "edge_sdk._plugins",
    "edge_sdk._layering",
    "edge_sdk._quiet",
    "edge_sdk.baseline",
    "edge_sdk.bundle",
    "edge_sdk.calibration",
    "edge_sdk.errors",
    "edge_sdk.formats",
    "edge_sdk.http_pool",
    "edge_sdk.httpbase",
    "edge_sdk.mqtt",
    "edge_sdk.preprocessing",
    "edge_sdk.progress",
    "edge_sdk.rollback_auth",
    "edge_sdk.safe_json",
    "edge_sdk.schema",
    "edge_sdk.signing",
    "edge_sdk.sketch",
    "edge_sdk.smoke",
    "edge_sdk.tomlfile",
    "edge_sdk.topics",
)

LAYERS: tuple[Layer, ...] = (
    # the root package re-exports core names and __version__ (see ALLOWED for its convert() shortcut)
    Layer("core", 0, CORE_MODULES, exact=("edge_sdk",)),
    Layer("runtimes", 1, ("edge_sdk.runtimes",)),
    Layer("targets", 2, ("edge_sdk.targets",)),
    Layer("benchmark", 2, ("edge_sdk.benchmark", "edge_sdk._bench_worker")),
    Layer("converters", 3, ("edge_sdk.converters", "edge_sdk.optimize")),
    Layer("agent", 3, ("edge_sdk.device_agent",)),
    Layer("fleet", 4, ("edge_sdk.fleet",)),
    Layer("testing", 5, ("edge_sdk.testing",)),
    # the retraining pipeline drives the converters, the registry, the gate and the rollout (issue 18)
    Layer("pipeline", 5, ("edge_sdk.pipeline",)),
    Layer("cli", 6, ("edge_sdk.cli",)),
)

#: Arrows against the layers that are deliberate, each with the reason; printed on every run so they stay visible.
ALLOWED: Mapping[tuple[str, str], str] = {
    ("edge_sdk", "edge_sdk.converters.pipeline"):
        "edge_sdk.convert() is the one-line public shortcut; the import is lazy, so `import edge_sdk` loads no "
        "converter and a device never reaches it",
}

#: The import roots of the product (pyproject ``package-dir``): the dotted name and where its files live.
ROOT_PACKAGES: tuple[str, ...] = ("edge_sdk", "edge_sdk.converters", "edge_sdk.device_agent", "edge_sdk.targets")


@dataclass(frozen=True)
class Edge:
    """One import statement from ``src`` to ``dst``; ``kind`` is module, lazy, type-checking or dynamic."""

    src: str
    dst: str
    path: Path
    line: int
    kind: str


@dataclass
class Report:
    """Everything one check found: the modules, the edges, and what is wrong with them."""

    modules: dict[str, Path]
    edges: list[Edge]
    back_arrows: list[tuple[Edge, str]] = field(default_factory=list)
    allowed: list[tuple[Edge, str]] = field(default_factory=list)
    unplaced: list[str] = field(default_factory=list)
    unresolved: list[Edge] = field(default_factory=list)
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        """True when nothing points against the layers, every module is placed and every import resolves."""
        return not (self.back_arrows or self.unplaced or self.unresolved)


def layer_of(module: str, layers: Sequence[Layer] = LAYERS) -> Layer | None:
    """The layer that claims ``module`` by its longest matching prefix, or None when no layer does."""
    best: tuple[int, Layer] | None = None
    for layer in layers:
        if module in layer.exact:
            return layer
        for prefix in layer.prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return best[1] if best else None


def default_roots() -> dict[str, Path]:
    """Where the installed (or editable) product's root packages live, found without importing them."""
    roots: dict[str, Path] = {}
    for name in ROOT_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"edge_sdk._layering: package {name} not found; install the project (pip install -e .)")
        roots[name] = Path(next(iter(spec.submodule_search_locations)))
    return roots


def discover(roots: Mapping[str, Path]) -> dict[str, Path]:
    """Every module below ``roots`` by dotted name (a package by its ``__init__.py``); caches are skipped."""
    modules: dict[str, Path] = {}
    for package, base in roots.items():
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base)
            if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            modules.setdefault(name, path)  # an installed wheel nests the sub-roots: the first sighting wins
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportVisitor(ast.NodeVisitor):
    """Collects (line, dotted target, kind) for every import in one module."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str, tuple[str, ...], str]] = []
        self._function_depth = 0
        self._type_checking_depth = 0

    def _kind(self) -> str:
        if self._type_checking_depth:
            return "type-checking"
        return "lazy" if self._function_depth else "module"

    def _function(self, node: ast.AST) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._type_checking_depth += 1
            for child in node.body:
                self.visit(child)
            self._type_checking_depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((node.lineno, alias.name, (), self._kind()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
            base = ".".join([*anchor, base]) if base else ".".join(anchor)
        self.found.append((node.lineno, base, tuple(a.name for a in node.names), self._kind()))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name == "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.found.append((node.lineno, node.args[0].value, (), "dynamic"))
        self.generic_visit(node)


def parse_imports(path: Path, module: str, modules: Mapping[str, Path]) -> tuple[list[Edge], list[Edge]]:
    """The product imports of one file as (resolved edges, edges to ``edge_sdk`` modules that do not exist)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    visitor = _ImportVisitor(module, path.name == "__init__.py")
    visitor.visit(tree)
    edges: list[Edge] = []
    missing: list[Edge] = []
    for line, target, names, kind in visitor.found:
        if target != "edge_sdk" and not target.startswith("edge_sdk."):
            continue
        if names:  # from X import a, b: each name is a submodule of X or an attribute of X
            dsts = {f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names}
        else:
            dsts = {target}
        for dst in sorted(dsts):
            edge = Edge(module, dst, path, line, kind)
            (edges if dst in modules else missing).append(edge)
    return edges, missing


def check(modules: Mapping[str, Path], layers: Sequence[Layer] = LAYERS,
          allowed: Mapping[tuple[str, str], str] = ALLOWED) -> Report:
    """Parse every module and hold each import against ``layers``."""
    report = Report(dict(modules), [])
    report.unplaced = sorted(m for m in modules if layer_of(m, layers) is None)
    for name, path in sorted(modules.items()):
        edges, missing = parse_imports(path, name, modules)
        report.edges.extend(edges)
        report.unresolved.extend(missing)
    for edge in report.edges:
        src, dst = layer_of(edge.src, layers), layer_of(edge.dst, layers)
        if src is None or dst is None or edge.src == edge.dst:
            continue
        report.pairs[(src.name, dst.name)] += 1
        if src.rank > dst.rank or src.name == dst.name:
            continue
        why = (f"{src.name} imports the higher layer {dst.name}" if dst.rank > src.rank
               else f"{src.name} imports its sibling {dst.name}")
        reason = allowed.get((edge.src, edge.dst))
        (report.allowed if reason else report.back_arrows).append((edge, reason or why))
    return report


def _where(edge: Edge, base: Path | None) -> str:
    path = edge.path
    if base is not None:
        try:
            path = path.relative_to(base)
        except ValueError:
            pass
    return f"{path}:{edge.line}"


def format_report(report: Report, layers: Sequence[Layer] = LAYERS, base: Path | None = None) -> Iterable[str]:
    """The human-readable graph by layer, then every problem with file:line."""
    order = sorted({layer.rank for layer in layers})
    bands = ["{" + " | ".join(la.name for la in layers if la.rank == r) + "}"
             if sum(la.rank == r for la in layers) > 1 else next(la.name for la in layers if la.rank == r)
             for r in order]
    yield f"edge_sdk layering: {len(report.modules)} modules, {len(report.edges)} imports of product modules"
    yield "layers (an import may only point left, or within its own layer): " + " ← ".join(bands)
    counts = Counter(la.name for m in report.modules if (la := layer_of(m, layers)))
    rank = {la.name: la.rank for la in layers}
    yield ""
    yield "modules per layer: " + ", ".join(f"{la.name} {counts.get(la.name, 0)}" for la in layers)
    yield ""
    yield "imports by layer pair (importer -> imported: count)"
    against = Counter((layer_of(e.src, layers).name, layer_of(e.dst, layers).name)  # type: ignore[union-attr]
                      for e, _ in report.back_arrows)
    for (src, dst), n in sorted(report.pairs.items(), key=lambda kv: (-rank[kv[0][0]], kv[0][0], -rank[kv[0][1]],
                                                                       kv[0][1])):
        mark = ""
        if rank[src] < rank[dst] or (rank[src] == rank[dst] and src != dst):
            mark = f"   <-- {against[(src, dst)]} against the layers" if against[(src, dst)] else "   (allowed, below)"
        yield f"  {src:>10} -> {dst:<10} {n:4d}{mark}"
    for edge, reason in report.allowed:
        yield f"allowed: {_where(edge, base)}: {edge.src} -> {edge.dst} ({edge.kind}): {reason}"
    yield ""
    yield f"back-arrows: {len(report.back_arrows)}"
    for edge, why in report.back_arrows:
        yield f"  {_where(edge, base)}: {edge.src} -> {edge.dst} ({edge.kind} import): {why}"
    for module in report.unplaced:
        yield (f"unplaced module: {module} ({_where(Edge(module, module, report.modules[module], 1, ''), base)}): "
               "add it to a layer in edge_sdk/_layering.py")
    for edge in report.unresolved:
        yield f"missing module: {_where(edge, base)}: {edge.src} imports {edge.dst}, which does not exist"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the graph; exit 1 when an import points against the layers or a module is unplaced or missing."""
    parser = argparse.ArgumentParser(prog="python -m edge_sdk._layering", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    roots = default_roots()
    report = check(discover(roots))
    base = roots["edge_sdk"].parent
    for line in format_report(report, base=base):
        print(line)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
