"""Validation of device payloads before anything is stored: any bytes in, a dict or one :class:`PayloadError` out.

Beyond the JSON Schemas in ``edge_sdk/schemas`` (compiled once per kind) a payload must be at most
:data:`MAX_PAYLOAD_BYTES`, UTF-8, strict JSON (no ``NaN``/``Infinity``, every number within the 64-bit integer
range, no lone surrogates, no NUL characters in strings), name the fleet and device of the topic it came on (a
device cannot speak for another), have ``end >= start``, a latency sketch whose bins add up to its count and map
to sane latencies, and a ``resend.unavailable`` event must carry ``{"stream": hex32, "ranges": [[first, last], ...]}``.
Patterns match whole strings (``"abc\n"`` does not match ``^abc$``).

Two interchangeable backends: ``jsonschema-rs`` + ``orjson`` (Rust; about 4x faster: the collector's ingest rate
depends on it) and ``fastjsonschema`` + :mod:`json` (pure Python), chosen by :func:`schema_backend` (the first
one whose packages are installed, or ``$EDGE_SDK_SCHEMA_BACKEND``). Both accept and refuse the same payloads
(tests/test_payload_fuzz.py holds them to one oracle).
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from edge_sdk import safe_json
from edge_sdk._deps import require
from edge_sdk.errors import PayloadError
from edge_sdk.topics import parse_topic

__all__ = ["BACKENDS", "KIND_SCHEMAS", "LEGACY_CLIENT_ERROR_KINDS", "MAX_PAYLOAD_BYTES", "PayloadError",
           "client_error_count", "schema_backend", "stream_of", "validate_message", "validate_payload"]

MAX_PAYLOAD_BYTES = 256 * 1024
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
KIND_SCHEMAS = {"telemetry": "telemetry.schema.json", "events": "event.schema.json", "status": "status.schema.json"}
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1  # what an INTEGER / BIGINT column holds
_SKETCH_MAX_LOG_MS = math.log(1e9)  # a bin beyond 1e-9 .. 1e9 ms is not a latency
BACKENDS = ("jsonschema-rs", "fastjsonschema")
#: error kinds that agents without ``client_errors`` in their windows recorded only for bad client input
LEGACY_CLIENT_ERROR_KINDS = ("input", "preprocess")
_validators: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()
_backend: str | None = None


def _no_remote(uri: str) -> Any:
    raise PayloadError(f"schema refers to remote {uri}, which is not fetched")


def _inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """Replace local ``#/$defs/X`` references by their definitions (the schemas are not recursive).

    fastjsonschema calls a function per ``$ref`` and formats the item's path for every array element it
    visits (``str.format(**locals())``); inlined definitions validate a window ~8x faster.
    """
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = _inline_refs(defs[ref[len("#/$defs/"):]], defs)
            rest = {k: _inline_refs(v, defs) for k, v in node.items() if k not in ("$ref", "description")}
            return {"allOf": [target], **rest} if rest else target
        out = {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
        return _bounded(_nullable(out))
    if isinstance(node, list):
        return [_inline_refs(x, defs) for x in node]
    return node


def _nullable(node: dict[str, Any]) -> dict[str, Any]:
    """``{"oneOf": [{"type": "null"}, S]}`` -> S with ``"null"`` added to its type (the same set of values when S
    only has keywords of its own type). fastjsonschema evaluates ``oneOf`` by raising and catching an exception
    per branch; a window has four such fields."""
    branches = node.get("oneOf")
    if not (isinstance(branches, list) and len(branches) == 2 and branches[0] == {"type": "null"}
            and isinstance(branches[1], dict) and isinstance(branches[1].get("type"), str)
            and not {"oneOf", "anyOf", "allOf", "not", "if", "const", "enum"} & set(branches[1])):
        return node
    merged = {k: v for k, v in node.items() if k != "oneOf"}
    merged.update(branches[1])
    merged["type"] = ["null", branches[1]["type"]]
    return merged


def _bounded(node: dict[str, Any]) -> dict[str, Any]:
    """Give every integer and number without a bound the 64-bit integer range, so that ``1e999`` (parsed as
    infinity) or ``10**30`` are refused by the schema check itself instead of by the database. No field of a
    device payload has a meaning beyond 9.2e18."""
    types = node.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    if "integer" not in types and "number" not in types:
        return node
    if "minimum" not in node and "exclusiveMinimum" not in node:
        node = {**node, "minimum": _INT_MIN}
    if "maximum" not in node and "exclusiveMaximum" not in node:
        node = {**node, "maximum": _INT_MAX}
    return node


def _whole_patterns(node: Any) -> Any:
    """Python's ``re.search`` lets ``$`` match before a final newline; ``\\Z`` does not (Rust's ``$`` never does)."""
    if isinstance(node, dict):
        out = {k: _whole_patterns(v) for k, v in node.items()}
        pattern = out.get("pattern")
        if isinstance(pattern, str) and pattern.endswith("$") and not pattern.endswith("\\$"):
            out["pattern"] = pattern[:-1] + "\\Z"
        return out
    if isinstance(node, list):
        return [_whole_patterns(x) for x in node]
    return node


def schema_backend(name: str | None = None) -> str:
    """The validation backend in use; ``name`` (one of :data:`BACKENDS`) switches to it.

    Default: ``$EDGE_SDK_SCHEMA_BACKEND`` if set, else jsonschema-rs when it and orjson are installed, else
    fastjsonschema.
    """
    global _backend
    if name is not None:
        if name not in BACKENDS:
            raise ValueError(f"schema backend {name!r} is not one of {', '.join(BACKENDS)}")
        if name == "jsonschema-rs":
            require("jsonschema_rs", extra="fleet", purpose="validating device payloads")
            require("orjson", extra="fleet", purpose="validating device payloads")
        else:
            require("fastjsonschema", extra="fleet", purpose="validating device payloads")
        _backend = name
    elif _backend is None:
        wanted = os.environ.get("EDGE_SDK_SCHEMA_BACKEND")
        if wanted:
            return schema_backend(wanted)
        from edge_sdk._deps import has_module

        _backend = "jsonschema-rs" if has_module("jsonschema_rs") and has_module("orjson") else "fastjsonschema"
    return _backend


def _validator(kind: str, backend: str) -> Any:
    v = _validators.get((kind, backend))
    if v is None:
        with _lock:
            v = _validators.get((kind, backend))
            if v is None:
                schema = json.loads((SCHEMA_DIR / KIND_SCHEMAS[kind]).read_text(encoding="utf-8"))
                schema = _inline_refs(schema, schema.get("$defs", {}))
                if backend == "jsonschema-rs":
                    import jsonschema_rs

                    v = jsonschema_rs.validator_for(schema)
                else:
                    import fastjsonschema

                    v = fastjsonschema.compile(_whole_patterns(schema),
                                               handlers={"http": _no_remote, "https": _no_remote})
                _validators[(kind, backend)] = v
    return v


def _reject_constant(name: str) -> Any:
    raise PayloadError(f"{name} is not a JSON number: send finite numbers only")


def _check_free_form(obj: Any, where: str) -> None:
    """Free-form parts (``extra``, event ``data``) are not typed by the schema: their numbers must still lie in
    the 64-bit integer range like every other number of a payload."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if not _INT_MIN <= item <= _INT_MAX:
                raise PayloadError(f"field {where}: holds a number outside -2**63..2**63-1")
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _check_strings(obj: Any, path: str = "") -> None:
    """Reject lone surrogates (from ``\\udXXX`` escapes; not UTF-8) and NUL characters (PostgreSQL text)."""
    stack: list[tuple[Any, str]] = [(obj, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise PayloadError(f"field {where or '(root)'}: string holds a NUL character (\\u0000)")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise PayloadError(f"field {where or '(root)'}: string holds an unpaired UTF-16 surrogate") from None
        elif isinstance(item, dict):
            for k, v in item.items():
                sub = f"{where}.{k}" if where else str(k)
                stack.append((k, sub))
                stack.append((v, sub))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))


def _schema_reason(exc: Any) -> str:
    name = str(getattr(exc, "name", "data") or "data")
    field = name[len("data."):] if name.startswith("data.") else ("(root)" if name == "data" else name)
    message = str(getattr(exc, "message", exc))
    if message.startswith(name + " "):
        message = message[len(name) + 1:]
    message = " ".join(message.split())
    if len(message) > 300:
        message = message[:297] + "..."
    return f"field {field}: {message}"


def _check_sketch(sketch: dict[str, Any]) -> None:
    gamma_log = math.log((1 + sketch["relative_accuracy"]) / (1 - sketch["relative_accuracy"]))
    total = float(sketch["zero_count"])
    for key, count in sketch["bins"].items():
        if abs(int(key) * gamma_log) > _SKETCH_MAX_LOG_MS + gamma_log:
            raise PayloadError(f"field latency_ms.sketch.bins: key {key} maps to a latency outside 1e-9..1e9 ms")
        total += count
    if not math.isclose(total, float(sketch["count"]), rel_tol=1e-6, abs_tol=1e-6):
        raise PayloadError(f"field latency_ms.sketch.count: {sketch['count']} does not match the sum of its bins "
                           f"and zero_count ({total:g})")


def _check_unavailable(data: dict[str, Any]) -> None:
    stream = data.get("stream")
    if not (isinstance(stream, str) and len(stream) == 32 and all(c in "0123456789abcdef" for c in stream)):
        raise PayloadError("field data.stream: resend.unavailable needs the stream (32 lowercase hex characters)")
    ranges = data.get("ranges")
    if not isinstance(ranges, list) or not ranges or len(ranges) > 1000:
        raise PayloadError("field data.ranges: resend.unavailable needs 1-1000 [first, last] seq ranges")
    for r in ranges:
        if (not isinstance(r, list) or len(r) != 2 or not all(type(x) is int and x >= 1 for x in r)
                or r[1] < r[0]):
            raise PayloadError(f"field data.ranges: {str(r)[:40]} is not a [first, last] pair of seqs >= 1 "
                               "with last >= first")


#: the nesting orjson accepts (its fixed limit); the json-module path keeps the same rule, so both backends accept
#: the same payloads (deeper is refused before the recursive parser runs: edge_sdk.safe_json)
ORJSON_MAX_DEPTH = 1024


def _parse_json(text: str) -> Any:
    try:
        return safe_json.loads(text, max_depth=ORJSON_MAX_DEPTH, parse_constant=_reject_constant)
    except PayloadError:
        raise
    except RecursionError:  # safe_json.JSONTooDeep included (it is also a JSONDecodeError)
        raise PayloadError("payload is not acceptable JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise PayloadError(f"payload is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. int conversion limits
        raise PayloadError(f"payload is not acceptable JSON: {str(exc).splitlines()[0][:200]}") from None


def _parse_orjson(payload: bytes, text: str) -> Any:
    import orjson

    try:
        return orjson.loads(payload)  # strict: no NaN/Infinity, no lone surrogates; depth limit 1024
    except orjson.JSONDecodeError as exc:
        reason = f"payload is not valid JSON: {str(exc).splitlines()[0][:200]}"
    _parse_json(text)  # refused payloads only: the json module's reason names NaN and friends more plainly
    raise PayloadError(reason)


def _rs_reason(validator: Any, obj: Any) -> str:
    for err in validator.iter_errors(obj):
        path = ".".join(str(p) for p in err.instance_path) or "(root)"
        return f"field {path}: {' '.join(str(err.message).split())[:300]}"
    return "payload does not match the schema"


def validate_payload(kind: str, payload: bytes, *, fleet: str | None = None, device: str | None = None
                     ) -> dict[str, Any]:
    """Parse and check one payload of topic kind ``telemetry`` / ``events`` / ``status``.

    ``fleet`` / ``device`` are those of the topic it arrived on; when given the payload must name the same
    ones. Returns the parsed dict; raises :class:`PayloadError` (and nothing else) for any input.
    """
    if kind not in KIND_SCHEMAS:
        raise PayloadError(f"topic kind {kind!r} carries no device payload: expected one of {', '.join(KIND_SCHEMAS)}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, not {type(payload).__name__}")
    size = len(payload)
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload is {size} bytes, over the {MAX_PAYLOAD_BYTES}-byte limit")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 (byte {exc.start}): send JSON text") from None
    backend = schema_backend()
    obj = _parse_orjson(payload, text) if backend == "jsonschema-rs" else _parse_json(text)
    if not isinstance(obj, dict):
        raise PayloadError(f"payload must be a JSON object, not {type(obj).__name__}")
    if "\\u0000" in text or (backend != "jsonschema-rs" and ("\\ud" in text or "\\uD" in text)):
        _check_strings(obj)
    validator = _validator(kind, backend)
    try:
        if backend == "jsonschema-rs":
            if not validator.is_valid(obj):
                raise PayloadError(_rs_reason(validator, obj))
        else:
            validator(obj)
    except PayloadError:
        raise
    except RecursionError:
        raise PayloadError("payload is not acceptable JSON: nested too deeply") from None
    except Exception as exc:  # the schema check must turn any input into a reason, never into a crash
        if type(exc).__name__ == "JsonSchemaValueException":
            raise PayloadError(_schema_reason(exc)) from None
        raise PayloadError(f"payload could not be checked against the schema ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None
    if fleet is not None and obj["fleet"] != fleet:
        raise PayloadError(f"field fleet: {obj['fleet']!r} differs from the topic's fleet {fleet!r}")
    if device is not None and obj["device"] != device:
        raise PayloadError(f"field device: {obj['device']!r} differs from the topic's device {device!r}")
    if kind == "telemetry":
        if "extra" in obj:
            _check_free_form(obj["extra"], "extra")
        if obj["end"] < obj["start"]:
            raise PayloadError(f"field end: {obj['end']} is before start {obj['start']}")
        _check_sketch(obj["latency_ms"]["sketch"])
    elif kind == "events":
        _check_free_form(obj["data"], "data")
        if obj["kind"] == "resend.unavailable":
            _check_unavailable(obj["data"])
    return obj


def client_error_count(window: dict[str, Any]) -> int:
    """How many of a window's ``errors`` the client's input caused (HTTP 4xx; not the model's fault).

    From ``client_errors``, each kind clamped to the same kind in ``errors`` (a device cannot hide model errors
    by over-claiming); a window without the field (older agents) counts its ``input`` and ``preprocess`` kinds,
    which those agents recorded only for bad input. Works on any dict (a damaged stored payload counts 0).
    """
    errors = window.get("errors") if isinstance(window, dict) else None
    if not isinstance(errors, dict):
        return 0
    client = window.get("client_errors")
    if not isinstance(client, dict):
        client = {k: errors.get(k) for k in LEGACY_CLIENT_ERROR_KINDS}
    total = 0
    for kind, n in client.items():
        have = errors.get(kind)
        if isinstance(n, (int, float)) and isinstance(have, (int, float)) and n > 0 and have > 0:
            total += int(min(n, have))
    return total


def stream_of(kind: str, obj: dict[str, Any]) -> tuple[str, str] | None:
    """(field, stream) of the outbox stream a validated payload writes to: a window's ``stream``, a
    ``resend.unavailable`` event's ``data.stream``; None otherwise. The collector lets only the stream's owner
    (the device that first sent it) write to it."""
    if kind == "telemetry":
        return "stream", obj["stream"]
    if kind == "events" and obj["kind"] == "resend.unavailable":
        return "data.stream", obj["data"]["stream"]
    return None


def validate_message(topic: str, payload: bytes) -> tuple[str, str, str, dict[str, Any]]:
    """``(fleet, device, kind, payload dict)`` of a message on a device topic; :class:`PayloadError` otherwise."""
    parsed = parse_topic(topic) if isinstance(topic, str) else None
    if parsed is None or parsed[2] not in KIND_SCHEMAS:
        shown = topic[:120] if isinstance(topic, str) else repr(topic)[:120]
        raise PayloadError(f"topic {shown!r} is not edge/<fleet>/<device>/(telemetry|events|status)")
    fleet, device, kind = parsed
    return fleet, device, kind, validate_payload(kind, payload, fleet=fleet, device=device)
