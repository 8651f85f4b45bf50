"""edge_sdk: convert, validate and bundle trained models for devices; run and watch them there.

Importing edge_sdk loads no training framework or runtime: each is imported inside the function
that needs it.
"""

from __future__ import annotations

from typing import Any

from edge_sdk.bundle import Artifact, Bundle, Manifest, TensorSpec, Validation
from edge_sdk.errors import (
    BundleError,
    CalibrationError,
    ConversionError,
    EdgeSDKError,
    InferenceError,
    InputError,
    MissingDependencyError,
    SourceModelError,
    TelemetryError,
    UnsupportedConversionError,
    ValidationError,
)
from edge_sdk.formats import Format, Framework, Precision, Task
from edge_sdk.preprocessing import Preprocessing

__version__ = "0.1.0"

__all__ = [
    "Artifact",
    "Bundle",
    "BundleError",
    "CalibrationError",
    "ConversionError",
    "EdgeSDKError",
    "Format",
    "Framework",
    "InferenceError",
    "InputError",
    "Manifest",
    "MissingDependencyError",
    "Precision",
    "Preprocessing",
    "SourceModelError",
    "Task",
    "TelemetryError",
    "TensorSpec",
    "UnsupportedConversionError",
    "Validation",
    "ValidationError",
    "__version__",
    "convert",
]


def convert(source: Any, **kwargs: Any) -> Bundle:
    """Convert a model to device artifacts, validate each one, and write a bundle.

    See :func:`edge_sdk.converters.pipeline.convert` for the arguments.
    """
    from edge_sdk.converters.pipeline import convert as _convert

    return _convert(source, **kwargs)
