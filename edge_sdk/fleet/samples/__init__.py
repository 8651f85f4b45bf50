"""Data samples captured on devices, in the collector: the store (files + index), its HTTP routes, export and
labels. ``from edge_sdk.fleet.samples import export_samples, label_samples`` is the plain Python API that
``edge-sdk data`` and the retraining pipeline call."""

from __future__ import annotations

from edge_sdk.fleet.samples.export import (
    COLUMNS,
    ExportResult,
    LabelResult,
    export_samples,
    label_samples,
    parse_since,
    read_labels_csv,
)
from edge_sdk.fleet.samples.store import SampleError, SampleMeta, SampleStore, apply_sample_retention, check_meta

__all__ = ["COLUMNS", "ExportResult", "LabelResult", "SampleError", "SampleMeta", "SampleStore",
           "apply_sample_retention", "check_meta", "export_samples", "label_samples", "parse_since",
           "read_labels_csv"]
