"""The import layering holds on the real tree, and the checker catches each kind of violation on a made-up tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge_sdk._layering import Report, check, default_roots, discover, layer_of, main


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    """Write ``files`` (path -> source) below tmp_path and return the roots the way pyproject maps them."""
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    roots = {"edge_sdk": tmp_path / "edge_sdk", "edge_sdk.converters": tmp_path / "converters",
             "edge_sdk.device_agent": tmp_path / "device_agent"}
    for base in roots.values():
        base.mkdir(exist_ok=True)
        (base / "__init__.py").touch()
    return roots


def _problems(report: Report) -> list[tuple[str, int, str, str]]:
    return [(e.path.name, e.line, e.dst, e.kind) for e, _ in report.back_arrows]


def test_the_product_has_no_import_against_the_layers() -> None:
    report = check(discover(default_roots()))
    lines = [f"{e.path}:{e.line} {e.src} -> {e.dst}: {why}" for e, why in report.back_arrows]
    lines += [f"unplaced {m}" for m in report.unplaced]
    lines += [f"missing {e.path}:{e.line} {e.dst}" for e in report.unresolved]
    assert report.ok, "\n".join(lines)
    # the walk saw the whole product, not an empty or partial tree
    assert {"edge_sdk.bundle", "edge_sdk.converters.pipeline", "edge_sdk.device_agent.agent",
            "edge_sdk.targets.compat", "edge_sdk.runtimes", "edge_sdk._layering"} <= set(report.modules)
    assert report.pairs[("agent", "core")] > 0 and report.pairs[("converters", "runtimes")] > 0


def test_the_device_never_reaches_the_converters() -> None:
    """The rule the whole layering exists for, stated on its own so that a layer reshuffle cannot drop it."""
    report = check(discover(default_roots()))
    assert not [e for e in report.edges if e.src.startswith("edge_sdk.device_agent")
                and e.dst.startswith("edge_sdk.converters")]
    assert layer_of("edge_sdk.device_agent.agent").rank == layer_of("edge_sdk.converters.base").rank  # type: ignore[union-attr]


def test_command_line_prints_the_graph_and_exits_zero() -> None:
    proc = subprocess.run([sys.executable, "-m", "edge_sdk._layering"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "back-arrows: 0" in proc.stdout
    assert "converters -> core" in proc.stdout


def test_back_arrows_siblings_and_kinds_are_reported_with_their_line(tmp_path: Path) -> None:
    roots = _tree(tmp_path, {
        "edge_sdk/bundle.py": "import json\nfrom edge_sdk.errors import X\n",
        "edge_sdk/errors.py": "X = 1\n",
        "edge_sdk/runtimes/__init__.py": "from edge_sdk.bundle import b\n\nfrom edge_sdk.fleet.db import Database\n",
        "edge_sdk/fleet/__init__.py": "from .db import Database\n",
        "edge_sdk/fleet/db.py": "from ..bundle import b\n",
        "device_agent/agent.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from edge_sdk.converters.base import Converter\n"
            "def run():\n"
            "    import edge_sdk.runtimes\n"
        ),
        "converters/base.py": (
            "import importlib\n"
            "def f():\n"
            "    return importlib.import_module('edge_sdk.device_agent.agent')\n"
        ),
    })
    report = check(discover(roots))
    assert sorted(_problems(report)) == [
        ("__init__.py", 3, "edge_sdk.fleet.db", "module"),  # runtimes -> fleet: points up
        ("agent.py", 3, "edge_sdk.converters.base", "type-checking"),  # agent -> converters: sibling
        ("base.py", 3, "edge_sdk.device_agent.agent", "dynamic"),  # converters -> agent: sibling
    ]
    assert not report.ok and not report.unplaced and not report.unresolved
    # relative imports resolve to real modules and stay inside fleet / point down
    assert report.pairs[("fleet", "core")] == 1 and report.pairs[("fleet", "fleet")] == 1
    assert report.pairs[("agent", "runtimes")] == 1  # the lazy import counts and is allowed


def test_an_unplaced_module_and_a_stale_import_fail(tmp_path: Path) -> None:
    roots = _tree(tmp_path, {
        "edge_sdk/bundle.py": "from edge_sdk.nowhere import thing\n",
        "edge_sdk/brand_new.py": "",
    })
    report = check(discover(roots))
    assert report.unplaced == ["edge_sdk.brand_new"]
    assert [(e.src, e.dst, e.line) for e in report.unresolved] == [("edge_sdk.bundle", "edge_sdk.nowhere", 1)]
    assert not report.back_arrows and not report.ok


def test_a_clean_tree_passes_and_main_returns_one_on_a_back_arrow(tmp_path: Path, monkeypatch, capsys) -> None:
    clean = {"edge_sdk/bundle.py": "", "converters/pipeline.py": "from edge_sdk import bundle\n"}
    assert check(discover(_tree(tmp_path / "a", clean))).ok
    bad = _tree(tmp_path / "b", {**clean, "edge_sdk/bundle.py": "def f():\n    from edge_sdk.converters import x\n"})
    monkeypatch.setattr("edge_sdk._layering.default_roots", lambda: bad)
    assert main([]) == 1
    out = capsys.readouterr().out
    assert "back-arrows: 1" in out and "bundle.py:2: edge_sdk.bundle -> edge_sdk.converters (lazy import)" in out
