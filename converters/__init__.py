"""Host-side converters: one module per (source, target) pair, all registered in one registry.

Importing this package registers every converter; none of them imports a framework until used.
"""

from __future__ import annotations

from edge_sdk.converters.base import (
    ArtifactDraft,
    ConversionContext,
    Converter,
    ConvertOptions,
    SourceModel,
    get_converter,
    register,
    registered,
)

__all__ = [
    "ArtifactDraft",
    "ConversionContext",
    "ConvertOptions",
    "Converter",
    "SourceModel",
    "get_converter",
    "register",
    "registered",
]
