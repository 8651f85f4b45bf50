"""Signed rollback authorisations: the only way a device goes to a lower version, or to another model.

A device refuses any bundle whose signed manifest names another model or a lower ``version_code`` than the one
it runs (edge_sdk.device_agent.update_guard), so replaying an old, validly signed bundle does nothing. A rollback
is still needed (the canary was unhealthy), so whoever holds a release key signs a small statement naming it::

    {"schema": "edge-sdk/rollback-authorisation", "schema_version": "1.0",
     "statement": {"id": "<32 hex>", "name": "tiny", "to_name": "tiny", "fleet": "f1" | null,
                   "from_version": "3", "from_version_code": 3, "to_version": "2", "to_version_code": 2,
                   "deployment_id": "..." | null, "reason": "...", "issued_at": 1.7e9, "expires_at": 1.7e9},
     "key_id": "<16 hex>", "signature": "<base64 ed25519 over the canonical JSON of statement>"}

Canonical JSON: ``json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``. The keys are
the same ed25519 release keys that sign bundles (:mod:`edge_sdk.signing`), so a device needs no other trust
anchor. A device uses an authorisation once (its ``id`` is remembered across restarts) and only while it runs
``from_version`` of ``name``; ``null`` fields are not checked (e.g. ``to_version`` when the rollout does not know
which version a device kept).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

from edge_sdk.signing import ALGORITHM, SignatureError, key_id, load_public_keys

__all__ = ["DEFAULT_TTL_S", "SCHEMA", "canonical", "sign_rollback", "verify_rollback"]

SCHEMA = "edge-sdk/rollback-authorisation"
SCHEMA_VERSION = "1.0"
DEFAULT_TTL_S = 30 * 86400.0  # a manual rollback may come weeks after the deployment that it undoes
_MAX_DOC = 8192
_FIELDS = ("name", "to_name", "fleet", "from_version", "from_version_code", "to_version", "to_version_code",
           "deployment_id", "reason")


def canonical(statement: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no spaces, ASCII only."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_rollback(private_key_path: str | os.PathLike, *, name: str, from_version: str | None = None,
                  to_version: str | None = None, from_version_code: int | None = None,
                  to_version_code: int | None = None, to_name: str | None = None, fleet: str | None = None,
                  deployment_id: str | None = None, reason: str | None = None, ttl_s: float = DEFAULT_TTL_S,
                  now: float | None = None) -> dict[str, Any]:
    """A rollback authorisation signed with an ed25519 private key (``edge-sdk keys new``); JSON-ready dict."""
    from edge_sdk.signing import _load_private_key

    if not name:
        raise SignatureError("a rollback authorisation needs the model name")
    if ttl_s <= 0:
        raise SignatureError(f"rollback authorisation ttl_s must be > 0, got {ttl_s}")
    key = _load_private_key(private_key_path)
    issued = time.time() if now is None else float(now)
    statement = {"id": uuid.uuid4().hex, "name": name, "to_name": to_name or name, "fleet": fleet,
                 "from_version": from_version, "from_version_code": from_version_code, "to_version": to_version,
                 "to_version_code": to_version_code, "deployment_id": deployment_id,
                 "reason": (reason or "")[:200], "issued_at": issued, "expires_at": issued + float(ttl_s)}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "statement": statement,
            "algorithm": ALGORITHM, "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(canonical(statement))).decode("ascii")}


def verify_rollback(doc: Any, trusted_keys: str | os.PathLike | Iterable[str | os.PathLike] | dict[str, Any], *,
                    now: float | None = None) -> dict[str, Any]:
    """The verified statement of a rollback authorisation; SignatureError (one line) when it is malformed, signed
    by an untrusted key, does not match its signature, or expired. ``trusted_keys`` as for
    :func:`edge_sdk.signing.load_public_keys` (or the dict it returns)."""
    from edge_sdk.signing import _ed25519_ok

    fix = "sign a new one with a trusted release key (Rollout rollback_key / edge-sdk rollback --rollback-key KEY)"
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or not isinstance(doc.get("statement"), dict):
        raise SignatureError(f"the rollback authorisation is malformed (not an {SCHEMA} document): {fix}")
    if len(json.dumps(doc, default=str)) > _MAX_DOC:
        raise SignatureError(f"the rollback authorisation is larger than {_MAX_DOC} bytes: {fix}")
    st = doc["statement"]
    kid, sig = doc.get("key_id"), doc.get("signature")
    if not isinstance(kid, str) or not isinstance(sig, str) or doc.get("algorithm", ALGORITHM) != ALGORITHM:
        raise SignatureError(f"the rollback authorisation is malformed (key_id, signature): {fix}")
    bad = [k for k in ("id", "name") if not isinstance(st.get(k), str) or not st.get(k)]
    bad += [k for k in ("issued_at", "expires_at") if isinstance(st.get(k), bool)
            or not isinstance(st.get(k), int | float)]
    bad += [k for k in _FIELDS if st.get(k) is not None and not isinstance(st.get(k), str | int)]
    if bad:
        raise SignatureError(f"the rollback authorisation is malformed ({', '.join(bad)}): {fix}")
    keys = trusted_keys if isinstance(trusted_keys, dict) else load_public_keys(trusted_keys)
    if kid not in keys:
        raise SignatureError(f"the rollback authorisation is signed by key {kid[:16]}, which this device does not "
                             f"trust: {fix}")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"the rollback authorisation's signature is not base64: {fix}") from None
    if not _ed25519_ok(keys[kid], raw, canonical(st)):
        raise SignatureError(f"the rollback authorisation does not match its signature (altered): {fix}")
    t = time.time() if now is None else now
    if t > float(st["expires_at"]):
        raise SignatureError(f"the rollback authorisation {st['id'][:12]} expired at {st['expires_at']:.0f} "
                             f"(now {t:.0f}): {fix}")
    return dict(st)
