"""Helpers for examples/corpus.py: load single model files out of fetched packages without importing them.

The packages pin ancient dependencies (or import napari, torchaudio, ...) in their ``__init__``, so each
model class is read from its own source file, with the offending import lines removed, and executed as a
standalone module.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path


def load_alone(path: Path, module_name: str, drop: tuple[str, ...] = (),
               inject: dict[str, object] | None = None) -> types.ModuleType:
    """Execute one source file as module ``module_name``, skipping lines that match any regex in ``drop``.

    ``inject`` pre-populates the module namespace (e.g. a stand-in for the package it would import).
    The module is registered in ``sys.modules`` so classes defined in it pickle and import by name.
    """
    if module_name in sys.modules:
        return sys.modules[module_name]
    lines = Path(path).read_text().splitlines()
    kept = [("" if any(re.search(d, ln) for d in drop) else ln) for ln in lines]
    mod = types.ModuleType(module_name)
    mod.__file__ = str(path)
    mod.__dict__.update(inject or {})
    sys.modules[module_name] = mod
    try:
        exec(compile("\n".join(kept) + "\n", str(path), "exec"), mod.__dict__)
    except BaseException:
        del sys.modules[module_name]
        raise
    return mod
