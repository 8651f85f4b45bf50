"""The model registry: bundles by name and version, with lineage, validation, holdout results and a state.

Bundles are stored as ``.tar.gz`` archives (``<store_dir>/<name>/<version>.tar.gz``, the exact bytes devices
download) and described in the collector's database (``migrations/0002_registry.sql``). Name and version come
from the bundle's manifest.

States and who moves a version between them::

    candidate --promote (evaluation gate passed, or --force REASON)--> canary
    canary    --deployment completed (rollout.py)-------------------> active   (the previous active -> retired)
    canary    --deployment rolled back (rollout.py)-----------------> retired
    retired   --promote------------------------------------------------> canary

Every change is recorded in ``model_transitions`` with its reason (and the gate figures for a promotion).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.bundle import Bundle, sha256_file, sha256_path
from edge_sdk.errors import BundleError, RegistryError

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.lifecycle.gate import GateDecision

__all__ = ["STATES", "Holdout", "ModelRecord", "Promotion", "Registry", "RegistryError", "parse_model_ref",
           "require_verified"]

STATES = ("candidate", "canary", "active", "retired")
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}$")
_SIGNATURE_NAME = "signature.json"  # edge_sdk.signing.SIGNATURE_NAME, without importing cryptography here


@dataclass(frozen=True)
class ModelRecord:
    """One model version as the registry knows it (a row of ``models``, JSON columns parsed)."""

    name: str
    version: str
    state: str
    bundle_sha256: str
    content_sha256: str
    archive_path: str
    size_bytes: int
    manifest: dict[str, Any]
    lineage: dict[str, Any]
    validation: dict[str, Any]
    holdout_result: dict[str, Any] | None
    signed_key_id: str | None
    signature_verified: bool
    created_at: float
    promoted_at: float | None
    force_reason: str | None
    state_reason: str | None
    updated_at: float

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"

    def to_dict(self, *, manifest: bool = False) -> dict[str, Any]:
        """JSON-ready dict (the manifest only when asked: it is large)."""
        d = asdict(self)
        if not manifest:
            d.pop("manifest")
        return d

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ModelRecord:
        """Build from a ``models`` row."""
        def js(v: Any) -> Any:
            return json.loads(v) if isinstance(v, str) and v else None
        return cls(
            name=row["name"], version=row["version"], state=row["state"], bundle_sha256=row["bundle_sha256"],
            content_sha256=row["content_sha256"], archive_path=row["archive_path"], size_bytes=int(row["size_bytes"]),
            manifest=js(row["manifest"]) or {}, lineage=js(row["lineage"]) or {},
            validation=js(row["validation"]) or {}, holdout_result=js(row["holdout_result"]),
            signed_key_id=row["signed_key_id"], signature_verified=bool(row["signature_verified"]),
            created_at=float(row["created_at"]), promoted_at=row["promoted_at"], force_reason=row["force_reason"],
            state_reason=row["state_reason"], updated_at=float(row["updated_at"]),
        )


@dataclass(frozen=True)
class Holdout:
    """The evaluation set registered for a model name (``inputs`` and ``labels`` arrays in an ``.npz``)."""

    name: str
    path: str
    sha256: str
    samples: int
    created_at: float


@dataclass(frozen=True)
class Promotion:
    """The outcome of :meth:`Registry.promote`: the updated record, the gate's decision, whether it was forced."""

    record: ModelRecord
    decision: GateDecision
    forced: bool


def parse_model_ref(text: str) -> tuple[str, str | None]:
    """``"name:version"`` -> (name, version); ``"name"`` -> (name, None)."""
    name, sep, version = text.partition(":")
    if not name or (sep and not version):
        raise RegistryError(f"model reference {text!r} is not NAME or NAME:VERSION")
    return name, version or None


def require_verified(rec: ModelRecord, action: str, allow_unsigned: bool) -> None:
    """RegistryError unless ``rec``'s signature was verified against trusted keys (or ``allow_unsigned``)."""
    if rec.signature_verified or allow_unsigned:
        return
    how = (f"signed by {rec.signed_key_id} but not verified (the registry had no trusted keys)" if rec.signed_key_id
           else "unsigned")
    raise RegistryError(f"refusing to {action} {rec.ref}: it is {how}; sign it (`edge-sdk bundle sign`) and add it "
                        "with --trusted-keys, or pass allow_unsigned=True (CLI --allow-unsigned) for development")


def _check_safe(value: str, what: str) -> str:
    if not _SAFE.match(value) or value in (".", ".."):
        raise RegistryError(f"{what} {value!r} cannot be stored: use 1-100 characters of A-Z a-z 0-9 _ . + - "
                            "(rebuild the bundle with --name / --model-version)")
    return value


def _lineage(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    build = m.extra.get("build") if isinstance(m.extra.get("build"), dict) else {}
    return {
        "source": dict(m.source),
        "task": str(m.task),
        "manifest_created_at": m.created_at,
        "schema_version": m.schema_version,
        "artifacts": {a.key: {"tool_versions": dict(a.tool_versions), "runtime": dict(a.runtime),
                              "sha256": a.sha256, "size_bytes": a.size_bytes} for a in m.artifacts},
        "build": {k: build[k] for k in ("target", "selected") if k in build},
    }


def _validation(bundle: Bundle) -> dict[str, Any]:
    m = bundle.manifest
    out: dict[str, Any] = {a.key: asdict(a.validation) for a in m.artifacts}
    if "validation_data" in m.extra:
        out["_data"] = m.extra["validation_data"]
    return out


class Registry:
    """Model versions stored in ``store_dir`` and described in the fleet database ``db``.

    ``trusted_keys`` (a directory of ``*.pub.pem`` files, a file, or a list): when given, a signed bundle must
    verify against them to be added (``require_signed=True`` also refuses unsigned ones); without it the
    signer's key id is recorded unverified. ``store_dir`` is needed only to add bundles and holdout sets.
    """

    def __init__(self, db: Database, store_dir: str | os.PathLike | None = None, *,
                 trusted_keys: Any = None, require_signed: bool = False) -> None:
        self.db = db
        self.store_dir = Path(store_dir).resolve() if store_dir is not None else None
        self.trusted_keys = trusted_keys
        self.require_signed = require_signed

    # ---- adding -----------------------------------------------------------------------------------------------

    def _store(self) -> Path:
        if self.store_dir is None:
            raise RegistryError("this registry has no store directory: pass store_dir (CLI: --store DIR)")
        return self.store_dir

    def _signature(self, root: Path) -> tuple[str | None, bool]:
        sig = root / _SIGNATURE_NAME
        if self.trusted_keys is not None and (sig.exists() or self.require_signed):
            from edge_sdk.signing import verify_bundle

            return verify_bundle(root, self.trusted_keys), True
        if not sig.exists():
            return None, False
        try:
            doc = json.loads(sig.read_text())
            ids = sorted({str(s["key_id"]) for s in doc["signatures"]})
        except (ValueError, KeyError, TypeError):
            raise BundleError(f"{sig} is malformed: re-sign the bundle with `edge-sdk bundle sign`") from None
        return ",".join(ids) or None, False

    def add(self, bundle_path: str | os.PathLike) -> ModelRecord:
        """Register a bundle directory or ``.tar.gz`` archive; return its record (state ``candidate``).

        The bundle is verified (every file against the manifest's sha256, the signature when trusted keys are
        configured) and archived into the store. Adding the same content again returns the existing record;
        the same name and version with different content is refused.
        """
        src = Path(bundle_path)
        if not src.exists():
            raise RegistryError(f"{src} not found: pass a bundle directory or a .tar.gz archive")
        with tempfile.TemporaryDirectory(prefix=".edge-sdk-add.") as tmp:
            if src.is_dir():
                bundle = Bundle.load(src)
            elif src.name.endswith((".tar.gz", ".tgz")):
                bundle = Bundle.extract(src, Path(tmp) / "bundle")
            else:
                raise RegistryError(f"{src} is neither a bundle directory nor a .tar.gz archive")
            bundle.verify()
            m = bundle.manifest
            name, version = _check_safe(m.name, "model name"), _check_safe(m.version, "model version")
            content = sha256_path(bundle.root)
            existing = self.get(name, version)
            if existing is not None:
                if existing.content_sha256 == content:
                    return existing
                raise RegistryError(f"{name}:{version} is already registered with different content (sha256 "
                                    f"{existing.content_sha256[:12]}, this bundle {content[:12]}): give the new bundle "
                                    "another version (convert --model-version)")
            key_id, verified = self._signature(bundle.root)
            dest = self._store() / name / f"{version}.tar.gz"
            dest.parent.mkdir(parents=True, exist_ok=True)
            bundle.archive(dest)
            now = time.time()
            row = {
                "name": name, "version": version, "state": "candidate", "bundle_sha256": sha256_file(dest),
                "content_sha256": content, "archive_path": str(dest), "size_bytes": dest.stat().st_size,
                "manifest": json.dumps(m.to_dict()), "lineage": json.dumps(_lineage(bundle)),
                "validation": json.dumps(_validation(bundle)), "signed_key_id": key_id,
                "signature_verified": int(verified), "created_at": now, "updated_at": now,
                "state_reason": f"added from {src}",
            }
        with self.db.transaction():
            self.db.execute(f"INSERT INTO models ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                            tuple(row.values()))
            self._transition(name, version, None, "candidate", f"added from {src}", None, now)
        return self.show(name, version)

    # ---- reading ----------------------------------------------------------------------------------------------

    def get(self, name: str, version: str) -> ModelRecord | None:
        """The record of ``name:version``, or None."""
        rows = self.db.query("SELECT * FROM models WHERE name = ? AND version = ?", (name, version))
        return ModelRecord.from_row(rows[0]) if rows else None

    def list(self, name: str | None = None) -> list[ModelRecord]:
        """Every version (of one model name when given), oldest first per name."""
        if name is None:
            rows = self.db.query("SELECT * FROM models ORDER BY name, created_at")
        else:
            rows = self.db.query("SELECT * FROM models WHERE name = ? ORDER BY created_at", (name,))
        return [ModelRecord.from_row(r) for r in rows]

    def active(self, name: str) -> ModelRecord | None:
        """The active version of ``name``, or None."""
        rows = self.db.query("SELECT * FROM models WHERE name = ? AND state = 'active' ORDER BY updated_at DESC",
                             (name,))
        return ModelRecord.from_row(rows[0]) if rows else None

    def show(self, name: str, version: str | None = None) -> ModelRecord:
        """One version; without ``version`` the active one, else the newest. RegistryError when unknown."""
        if version is not None:
            rec = self.get(name, version)
            if rec is None:
                have = ", ".join(r.version for r in self.list(name)) or "none"
                raise RegistryError(f"{name}:{version} is not registered (versions of {name}: {have}): add it with "
                                    "`edge-sdk registry add BUNDLE`")
            return rec
        rec = self.active(name)
        if rec is None:
            versions = self.list(name)
            if not versions:
                raise RegistryError(f"no model named {name!r} is registered: add it with `edge-sdk registry add "
                                    "BUNDLE`")
            rec = versions[-1]
        return rec

    def transitions(self, name: str, version: str | None = None) -> list[dict[str, Any]]:
        """The recorded state changes (figures parsed), oldest first."""
        sql, params = "SELECT * FROM model_transitions WHERE name = ?", [name]
        if version is not None:
            sql, params = sql + " AND version = ?", [*params, version]
        rows = self.db.query(sql + " ORDER BY ts, id", tuple(params))
        for r in rows:
            r["figures"] = json.loads(r["figures"]) if r.get("figures") else None
        return rows

    def record_lineage(self, name: str, version: str, key: str, value: Any) -> ModelRecord:
        """Set ``lineage[key]`` of a version (e.g. the retraining pipeline's steps, inputs, outputs and figures:
        edge_sdk.pipeline); the rest of its lineage is kept. Shown by ``edge-sdk registry show``."""
        with self.db.transaction():
            rec = self.show(name, version)
            lineage = {**rec.lineage, key: value}
            self.db.execute("UPDATE models SET lineage = ?, updated_at = ? WHERE name = ? AND version = ?",
                            (json.dumps(lineage), time.time(), name, version))
        return self.show(name, version)

    # ---- state ------------------------------------------------------------------------------------------------

    def _transition(self, name: str, version: str, old: str | None, new: str, reason: str,
                    figures: dict[str, Any] | None, ts: float) -> None:
        self.db.execute("INSERT INTO model_transitions (name, version, ts, from_state, to_state, reason, figures) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (name, version, ts, old, new, reason, json.dumps(figures) if figures is not None else None))

    def set_state(self, name: str, version: str, state: str, reason: str, *,
                  figures: dict[str, Any] | None = None) -> ModelRecord:
        """Move a version to ``state`` and record why. Activating retires the previous active version."""
        if state not in STATES:
            raise RegistryError(f"unknown state {state!r}: use one of {', '.join(STATES)}")
        rec = self.show(name, version)
        now = time.time()
        with self.db.transaction():
            if state == "active":
                for old in self.db.query("SELECT version, state FROM models WHERE name = ? AND state = 'active' "
                                         "AND version <> ?", (name, version)):
                    self.db.execute("UPDATE models SET state = 'retired', state_reason = ?, updated_at = ? "
                                    "WHERE name = ? AND version = ?",
                                    (f"replaced by {name}:{version}", now, name, old["version"]))
                    self._transition(name, old["version"], "active", "retired", f"replaced by {name}:{version}",
                                     figures, now)
            if rec.state != state:
                self.db.execute("UPDATE models SET state = ?, state_reason = ?, updated_at = ? WHERE name = ? AND "
                                "version = ?", (state, reason, now, name, version))
                self._transition(name, version, rec.state, state, reason, figures, now)
        return self.show(name, version)

    def activate(self, name: str, version: str, reason: str = "activated") -> ModelRecord:
        """Make ``name:version`` the active version (the one the gate compares candidates with)."""
        return self.set_state(name, version, "active", reason)

    # ---- holdout and promotion --------------------------------------------------------------------------------

    def register_holdout(self, name: str, npz_path: str | os.PathLike) -> Holdout:
        """Register (or replace) the evaluation set of model ``name``: an ``.npz`` with ``inputs`` and ``labels``."""
        import numpy as np

        src = Path(npz_path)
        try:
            with np.load(src, allow_pickle=False) as data:
                missing = [k for k in ("inputs", "labels") if k not in data.files]
                if missing:
                    raise RegistryError(f"{src} has no {' / '.join(missing)} array (it has: "
                                        f"{', '.join(data.files) or 'none'}): save it with np.savez(path, "
                                        "inputs=X, labels=y)")
                x, y = data["inputs"], data["labels"]
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{src} is not a readable .npz file ({exc}): save it with np.savez") from None
        if y.ndim != 1 or y.dtype.kind not in "iu" or len(x) != len(y) or len(y) == 0:
            raise RegistryError(f"{src}: labels must be a non-empty 1-D integer array with one label per input "
                                f"(inputs {list(x.shape)}, labels {list(y.shape)} {y.dtype})")
        digest = sha256_file(src)
        dest = self._store() / _check_safe(name, "model name") / f"holdout-{digest[:16]}.npz"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            tmp = dest.with_name(dest.name + ".partial")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        now = time.time()
        with self.db.transaction():
            self.db.execute("DELETE FROM holdouts WHERE name = ?", (name,))
            self.db.execute("INSERT INTO holdouts (name, path, sha256, samples, created_at) VALUES (?, ?, ?, ?, ?)",
                            (name, str(dest), digest, len(y), now))
        return Holdout(name, str(dest), digest, len(y), now)

    def holdout(self, name: str) -> Holdout | None:
        """The registered evaluation set of ``name``, or None."""
        rows = self.db.query("SELECT * FROM holdouts WHERE name = ?", (name,))
        if not rows:
            return None
        r = rows[0]
        return Holdout(r["name"], r["path"], r["sha256"], int(r["samples"]), float(r["created_at"]))

    def evaluate(self, name: str, version: str) -> dict[str, Any]:
        """Evaluate a version on its name's holdout set and store the result on the record."""
        from edge_sdk.fleet.lifecycle.gate import evaluate_archive

        rec = self.show(name, version)
        hold = self.holdout(name)
        if hold is None:
            raise RegistryError(f"no holdout set is registered for {name}: `edge-sdk registry holdout {name} "
                                "FILE.npz` (arrays inputs, labels)")
        result = evaluate_archive(rec.archive_path, hold)
        self.db.execute("UPDATE models SET holdout_result = ? WHERE name = ? AND version = ?",
                        (json.dumps(result), name, version))
        return result

    def promote(self, name: str, version: str, *, force_reason: str | None = None,
                tolerance_pp: float = 0.5, allow_unsigned: bool = False) -> Promotion:
        """Run the evaluation gate against the active version and, when it passes, move the version to canary.

        Refused (:class:`~edge_sdk.fleet.lifecycle.gate.GateError`, one line naming both accuracies and the tolerance)
        when the candidate is worse than the active version by more than ``tolerance_pp`` percentage points on
        the holdout set, or when there is an active version but no holdout set; ``force_reason`` overrides the
        refusal and is recorded. The first version of a name (no active one) passes without comparison. A version
        whose signature was not verified when it was added (unsigned, or no trusted keys) is refused unless
        ``allow_unsigned`` (CLI ``--allow-unsigned``): devices with trusted keys would refuse it anyway.
        """
        from edge_sdk.fleet.lifecycle.gate import GateDecision, GateError, gate

        if force_reason is not None and not force_reason.strip():
            raise RegistryError("--force needs a reason (it is recorded): e.g. --force \"hotfix for ticket 123\"")
        rec = self.show(name, version)
        if rec.state in ("canary", "active"):
            raise RegistryError(f"{rec.ref} is already {rec.state}: nothing to promote")
        require_verified(rec, "promote", allow_unsigned)
        current = self.active(name)
        hold = self.holdout(name)
        cand = self.evaluate(name, version) if hold is not None else None
        if current is None:
            decision = GateDecision(True, f"no active version of {name}: nothing to compare with",
                                    {"candidate": cand, "active": None, "tolerance_pp": tolerance_pp})
        elif hold is None:
            decision = GateDecision(False, f"no holdout set is registered for {name} to compare {rec.ref} with "
                                    f"active {current.ref}: `edge-sdk registry holdout {name} FILE.npz`",
                                    {"candidate": None, "active": None, "tolerance_pp": tolerance_pp})
        else:
            decision = gate(cand, self.evaluate(name, current.version), tolerance_pp,
                            candidate=rec.ref, active=current.ref)
        if not decision.accepted and force_reason is None:
            raise GateError(f"promotion of {rec.ref} refused: {decision.reason} — improve the model, or pass "
                            "--force REASON to promote it anyway (the reason is recorded)", decision)
        forced = not decision.accepted
        reason = (f"forced past the gate: {force_reason} (gate: {decision.reason})" if forced else
                  f"gate passed: {decision.reason}" + (f"; force reason given: {force_reason}" if force_reason else ""))
        now = time.time()
        with self.db.transaction():
            self.db.execute("UPDATE models SET state = 'canary', promoted_at = ?, force_reason = ?, state_reason = ?, "
                            "updated_at = ? WHERE name = ? AND version = ?",
                            (now, force_reason, reason, now, name, version))
            self._transition(name, version, rec.state, "canary", reason,
                             {**decision.figures, "accepted": decision.accepted, "forced": forced}, now)
        return Promotion(self.show(name, version), decision, forced)
