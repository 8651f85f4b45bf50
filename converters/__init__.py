"""Host-side converters: one module per (source, target) pair, all in one registry (converters/registry.py).

Importing this package fills the registry: the built-in converter modules, then third-party converters from the
entry-point group ``edge_sdk.converters``. None of them imports a framework until used.
"""

from __future__ import annotations

import sys

from edge_sdk.errors import EdgeSDKError

if sys.version_info < (3, 11):  # noqa: UP036 -- the device side runs on 3.10 (Jetson, Ubuntu 22.04); this does not
    raise EdgeSDKError(f"edge_sdk.converters needs Python 3.11+ (this is {sys.version.split()[0]}): convert on a "
                       "3.11+ host; Python 3.10 runs the device side (edge-sdk agent) only")

from edge_sdk.converters.base import (
    ArtifactDraft,
    ConversionContext,
    Converter,
    ConvertOptions,
    LadderStep,
    OptionSpec,
    SourceModel,
    get_converter,
    register,
    registered,
)
from edge_sdk.converters.registry import load_builtin_converters, load_entry_points, target_formats, unregister

__all__ = [
    "ArtifactDraft",
    "ConversionContext",
    "ConvertOptions",
    "Converter",
    "LadderStep",
    "OptionSpec",
    "SourceModel",
    "get_converter",
    "register",
    "registered",
    "target_formats",
    "unregister",
]

load_builtin_converters()
load_entry_points()
