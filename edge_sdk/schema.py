"""JSON Schemas shipped with the package (``edge_sdk/schemas/*.json``) and validation against them."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from edge_sdk.errors import BundleError

__all__ = ["load_schema", "validate_manifest"]


@cache
def load_schema(name: str = "manifest") -> dict[str, Any]:
    """The parsed schema ``edge_sdk/schemas/<name>.schema.json``."""
    text = resources.files("edge_sdk").joinpath("schemas", f"{name}.schema.json").read_text()
    return json.loads(text)


def validate_manifest(data: dict[str, Any]) -> None:
    """Raise BundleError listing every schema violation of a manifest dict."""
    from edge_sdk._deps import require

    jsonschema = require("jsonschema", "host", "validating manifests against the JSON Schema")

    validator = jsonschema.Draft202012Validator(load_schema("manifest"))
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        where = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:10])
        raise BundleError(f"manifest does not match schema {data.get('schema_version')}: {where}")
