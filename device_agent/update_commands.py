"""MQTT ``cmd/update`` / ``cmd/rollback`` handling of the :class:`~edge_sdk.device_agent.updater.Updater`.

Kept apart from the install machinery because every line here judges untrusted input: the command's shape,
expiry and id (:class:`~edge_sdk.device_agent.update_guard.Guard`), the URL (http(s) only) and size (required),
the signed rollback authorisation, and the memory of what was refused or carried out before. A refusal emits
``update.refused`` and returns ``{"status": "refused", "reason": ...}``; nothing is downloaded for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_sdk.device_agent.download import is_remote, redact_text, redact_url
from edge_sdk.device_agent.model_store import UpdateError
from edge_sdk.device_agent.update_guard import identity_of

if TYPE_CHECKING:
    from edge_sdk.device_agent.model_store import ModelStore
    from edge_sdk.device_agent.update_guard import Guard

__all__ = ["CommandHandling"]


class _Refused(Exception):
    """Internal: a command is refused before anything is downloaded (one-line reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommandHandling:
    """Mixin of :class:`~edge_sdk.device_agent.updater.Updater`: the MQTT command entry points."""

    store: ModelStore
    guard: Guard
    trusted_keys: Any
    max_download_bytes: int
    last_result: dict[str, Any] | None

    if TYPE_CHECKING:
        def _emit(self, kind: str, data: dict[str, Any], level: str = "info") -> None: ...
        def update(self, url_or_path: Any, **kw: Any) -> Path: ...
        def rollback(self, *, reason: str = "requested", authorisation: dict[str, Any] | None = None) -> Path: ...

    def handle_command(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Carry out ``cmd/update`` or ``cmd/rollback`` (blocking) and return what happened as a dict with
        ``status``: switched | current | refused | failed | rolled_back | ignored, plus details. Never raises for a
        failed update: the failure is in the result (and was reported as an ``update.failed`` event)."""
        try:
            if name not in ("update", "rollback"):
                result = {"status": "ignored", "reason": f"unknown command {name!r}"}
            elif not isinstance(payload, dict):
                result = self._refuse(name, {}, f"cmd/{name} is not a JSON object")
            elif problem := self.guard.command_problem(name, payload):
                result = self._refuse(name, payload, problem)
            elif name == "update":
                result = self._command_update(payload)
            else:
                result = self._command_rollback(payload)
        except UpdateError as exc:
            result = {"status": "failed", "reason": redact_text(str(exc))}
        result["command"] = name
        if isinstance(payload, dict) and isinstance(payload.get("command_id"), str):
            result["command_id"] = payload["command_id"][:64]
        self.last_result = result
        return result

    def _refuse(self, name: str, payload: dict[str, Any], reason: str) -> dict[str, Any]:
        """Refuse a command: an ``update.refused`` event, and the result to return."""
        cid = payload.get("command_id")
        self._emit("update.refused", {"command": name, "command_id": cid if isinstance(cid, str) else None,
                                      "deployment_id": payload.get("deployment_id")
                                      if isinstance(payload.get("deployment_id"), str) else None,
                                      "reason": reason}, "warning")
        return {"status": "refused", "reason": reason}

    def _authorisation(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The verified statement of the command's ``authorisation`` (None when it has none); UpdateError when
        it does not verify."""
        doc = payload.get("authorisation")
        if doc is None or self.trusted_keys is None:
            return None
        from edge_sdk.rollback_auth import verify_rollback
        from edge_sdk.signing import SignatureError

        try:
            return verify_rollback(doc, self.trusted_keys)
        except SignatureError as exc:
            raise _Refused(str(exc)) from None

    def _command_rollback(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            auth = self._authorisation(payload)
        except _Refused as exc:
            return self._refuse("rollback", payload, exc.reason)
        if auth is None and self.trusted_keys is not None:
            return self._refuse("rollback", payload, "cmd/rollback needs an authorisation signed by a trusted "
                                "release key that names the target version (Rollout rollback_key)")
        cur_dir, prev_dir = self.store.link("current"), self.store.link("previous")
        cur = identity_of(self.store.info(cur_dir) if cur_dir else None)
        prev = identity_of(self.store.info(prev_dir) if prev_dir else None)
        target = payload.get("target_version")
        if target is not None and (prev is None or str(target) != prev[1]):
            return self._refuse("rollback", payload, f"cmd/rollback names target version {str(target)[:40]!r}, "
                                f"the version kept here is {prev[1] if prev else 'none'}")
        if auth is not None:
            if self.guard.seen("authorisations", str(auth["id"])):
                return self._refuse("rollback", payload, f"the rollback authorisation {auth['id'][:12]} was used "
                                    "already")
            mismatch = self.guard.authorisation_mismatch(auth, cur, prev)
            if mismatch:
                return self._refuse("rollback", payload, f"the rollback authorisation {auth['id'][:12]} {mismatch}")
        reason = payload.get("reason")
        path = self.rollback(reason=str(reason)[:200] if reason else "rollback command", authorisation=auth)
        exp = payload.get("expires_at")
        self.guard.remember(command_id=payload.get("command_id"), authorisation=auth,
                            expires_at=float(exp) if isinstance(exp, int | float) else None)
        return {"status": "rolled_back", "bundle": str(path)}

    def _command_update(self, payload: dict[str, Any]) -> dict[str, Any]:
        model = payload.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("url"), str) or not model["url"]:
            reason = "cmd/update needs model.url, model.size_bytes (and should give model.sha256)"
            self._emit("update.failed", {"step": "command", "reason": reason}, "error")
            return {"status": "failed", "reason": reason}
        if not is_remote(model["url"]):
            return self._refuse("update", payload, f"cmd/update model.url {redact_url(model['url'])[:100]!r} is not an "
                                "http(s) URL: updates from MQTT are downloaded only over http or https")
        sha = model.get("sha256") if isinstance(model.get("sha256"), str) else None
        size = model.get("size_bytes")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= self.max_download_bytes:
            return self._refuse("update", payload, f"cmd/update needs model.size_bytes, a whole number of bytes "
                                f"in 1..{self.max_download_bytes} (got {str(size)[:40]!r})")
        dep = payload.get("deployment_id")
        cur = self.store.info(self.store.link("current")) if self.store.link("current") else None
        same = (cur.archive_sha256 == sha.lower()) if cur is not None and sha else \
            cur is not None and model.get("name") == cur.name and str(model.get("version")) == cur.version
        if same and cur is not None:
            return {"status": "current", "version": cur.label}
        state = self.store.read_state()
        refused = [e for e in state.get("failures", []) + state.get("history", [])
                   if e.get("action") in ("failed", "rolled_back") and not e.get("transient")
                   and sha and e.get("sha256") == sha.lower() and e.get("deployment_id") == dep]
        cur_dir = self.store.link("current")
        refused += [e for e in state.get("failures", []) if e.get("step") == "policy" and sha
                    and e.get("sha256") == sha.lower() and cur_dir is not None and e.get("current") == cur_dir.name
                    and payload.get("authorisation") is None]  # refused for who it is: the same again, same answer
        if refused:
            last = refused[-1]
            why = last.get("reason") if last.get("action") == "failed" else f"rolled back ({last.get('reason')})"
            return self._refuse("update", payload, f"this update was refused before: {why}")
        try:
            auth = self._authorisation(payload)
        except _Refused as exc:
            return self._refuse("update", payload, exc.reason)
        path = self.update(model["url"], expected_sha256=sha, expected_size=size, name=model.get("name"),
                           version=None if model.get("version") is None else str(model["version"]),
                           deployment_id=dep, authorisation=auth)
        info = self.store.info(path.parent)
        return {"status": "switched", "version": info.label if info else None, "bundle": str(path)}
