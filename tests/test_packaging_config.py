"""pyproject's explicit package list stays complete: a folder missing from it is silently left out of the wheel
and makes every `pip install` print setuptools' "Package would be ignored" warning (issue 12)."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
SKIP_DIRS = {"__pycache__"}
SKIP_FILES = {".DS_Store"}


def _folder(package: str) -> Path:
    """The folder a dotted package name maps to, honouring package-dir (converters/ -> edge_sdk.converters)."""
    mapping: dict[str, str] = CONFIG.get("package-dir", {})
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[i:])
    return ROOT / Path(*parts)


def _shipped_folders() -> dict[Path, str]:
    """Every folder under a listed top-level package root, with the dotted name it has once installed."""
    found: dict[Path, str] = {}
    for package in CONFIG["packages"]:
        base = _folder(package)
        found[base] = package
        for sub in base.rglob("*"):
            if sub.is_dir() and not SKIP_DIRS & set(sub.relative_to(base).parts):
                found.setdefault(sub, package + "." + ".".join(sub.relative_to(base).parts))
    return found


def test_every_package_and_data_folder_is_listed() -> None:
    listed = set(CONFIG["packages"])
    missing = sorted(name for folder, name in _shipped_folders().items()
                     if name not in listed and any(folder.iterdir()))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = sorted(p for p in listed if not _folder(p).is_dir())
    assert not stale, f"listed in pyproject.toml but no such folder: {stale}"


def test_every_data_file_matches_package_data() -> None:
    patterns: dict[str, list[str]] = CONFIG["package-data"]
    uncovered = []
    for package in CONFIG["packages"]:
        for f in _folder(package).iterdir():
            if f.is_file() and f.suffix not in {".py", ".pyc"} and f.name not in SKIP_FILES:
                if not any(fnmatch.fnmatch(f.name, pat) for pat in patterns.get(package, [])):
                    uncovered.append(f"{package}: {f.name}")
    assert not uncovered, f"not shipped; add to [tool.setuptools.package-data]: {uncovered}"
