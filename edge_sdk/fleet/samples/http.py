"""The collector's sample routes, served by its HTTP server (``edge_sdk/fleet/dashboard/server.py`` hands every
``/api/samples`` request here) under the same token as the rest of its API::

    POST /api/samples          body: the captured bytes (PNG, JPEG or .npy; at most the store's max_sample_bytes)
                               header X-Edge-Sample: compact JSON {"sha256", "fleet", "device", "model_name",
                               "model_version", "prediction", "confidence", "label", "policy", "captured_at"}
                               -> 201 {"sha256", "stored": true} | 200 {"sha256", "stored": false} (a duplicate)
    POST /api/samples/labels   JSON {"fleet": F, "labels": [{"sha256": ..., "label": 3}, ...]}  (labels from /feedback
                               that reached the device after the sample was uploaded; at most 10,000 per request)
                               -> 200 {"updated", "unknown": [first 100 hashes], "unknown_count"}
    GET  /api/samples?fleet=F  -> 200 {"count", "bytes", "labelled", "by_policy"}

A device deletes a sample only after an answer carrying its sha256. Refusals are one-line JSON errors, and nothing is
stored: 400 (metadata, hash mismatch, truncated .npy), 401 (no token), 411/413 (length missing or over the limit),
415 (not PNG/JPEG/.npy, or an object .npy), 404 when the collector runs without a samples folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from edge_sdk import safe_json
from edge_sdk.device_agent.capture import SAMPLE_HEADER
from edge_sdk.errors import HTTPError
from edge_sdk.fleet.samples.store import SHA256, SampleError, check_meta
from edge_sdk.topics import validate_id

if TYPE_CHECKING:
    from edge_sdk.fleet.samples.store import SampleStore
    from edge_sdk.httpbase import RequestHandler

__all__ = ["MAX_LABELS", "handle_samples_request"]

MAX_LABELS = 10_000
_MAX_META_CHARS = 4096
_LABELS_MAX_BODY = 1024 * 1024


def _refused(exc: SampleError) -> HTTPError:
    kind = {413: "payload_too_large", 415: "unsupported_media_type"}.get(exc.status, "bad_sample")
    return HTTPError(exc.status, kind, str(exc))


def handle_samples_request(req: RequestHandler, store: SampleStore | None) -> None:
    """Answer one ``/api/samples`` request on ``req`` (the module docstring lists the routes)."""
    route = req.route()
    if store is None:
        raise HTTPError(404, "not_found", f"{route}: this collector stores no samples: start it with "
                        "`edge-sdk collector run --http HOST:PORT --samples-dir DIR`")
    if route == "/api/samples" and req.command in ("GET", "HEAD"):
        query = {k: v[-1] for k, v in parse_qs(urlsplit(req.path).query).items()}
        fleet = query.get("fleet") or None
        if fleet is not None:
            try:
                validate_id(fleet, "fleet")
            except ValueError as exc:
                raise HTTPError(400, "bad_request", str(exc)) from None
        req.send_json(200, store.summary(fleet), {"Cache-Control": "no-store"})
        return
    if route not in ("/api/samples", "/api/samples/labels"):
        raise HTTPError(404, "not_found", f"no route {route}: use POST /api/samples or POST /api/samples/labels")
    if req.command != "POST":
        raise HTTPError(405, "method_not_allowed", f"{req.command} {route} is not allowed: use POST",
                        {"Allow": "POST" if route.endswith("labels") else "GET, HEAD, POST"})
    try:
        if route == "/api/samples":
            status, doc = _upload(req, store)
        else:
            status, doc = _labels(req, store)
    except SampleError as exc:
        raise _refused(exc) from None
    req.send_json(status, doc)


def _upload(req: RequestHandler, store: SampleStore) -> tuple[int, dict[str, Any]]:
    text = req.headers.get(SAMPLE_HEADER)
    if not text:
        raise SampleError(f"the {SAMPLE_HEADER} header with the sample's JSON metadata is missing")
    if len(text) > _MAX_META_CHARS:
        raise SampleError(f"the {SAMPLE_HEADER} header is over {_MAX_META_CHARS} characters")
    try:
        doc = safe_json.loads(text)
    except ValueError as exc:
        raise SampleError(f"the {SAMPLE_HEADER} header is not valid JSON ({exc})") from None
    meta = check_meta(doc)
    body = req.read_body(store.max_sample_bytes)  # 411 / 413 before reading
    stored = store.add(meta, body)
    return (201 if stored else 200), {"sha256": meta.sha256, "stored": stored}


def _labels(req: RequestHandler, store: SampleStore) -> tuple[int, dict[str, Any]]:
    try:
        doc = safe_json.loads(req.read_body(_LABELS_MAX_BODY))
    except ValueError as exc:
        raise SampleError(f"the label update is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("labels"), list):
        raise SampleError('the label update must be {"fleet": F, "labels": [{"sha256": ..., "label": N}, ...]}')
    try:
        fleet = validate_id(doc.get("fleet"), "fleet")  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise SampleError(f"label update 'fleet': {exc}") from None
    labels = doc["labels"]
    if len(labels) > MAX_LABELS:
        raise SampleError(f"{len(labels)} labels in one update: send at most {MAX_LABELS}", 413)
    items: list[tuple[str, int]] = []
    for i, item in enumerate(labels):
        sha = item.get("sha256") if isinstance(item, dict) else None
        label = item.get("label") if isinstance(item, dict) else None
        if not isinstance(sha, str) or not SHA256.match(sha) or isinstance(label, bool) or not isinstance(label, int) \
                or not 0 <= label < 2**31:
            raise SampleError(f"labels[{i}] must be {{\"sha256\": <64 hex digits>, \"label\": <class index>}}")
        items.append((sha, label))
    updated, unknown = store.set_labels(items, fleet=fleet, source="feedback")
    return 200, {"updated": updated, "unknown": unknown[:100], "unknown_count": len(unknown)}
