"""Over-the-air model updates on the device: download, verify, smoke-test, switch atomically, roll back.

:class:`Updater` drives a :class:`~edge_sdk.device_agent.model_store.ModelStore`. One update goes::

    update.downloading  -> staging/<id>.part, resumed with HTTP Range after a dropped link or a restart
    update.downloaded   -> size and sha256 checked against the command
    (unpack)            -> Bundle.extract: no absolute paths, no '..', no links, bounded size
    update.verified     -> ed25519 signature by a trusted key (edge_sdk.signing) and every file's sha256
    update.smoke_test   -> the device Agent loads the bundle on this device's runtime and runs its smoke sample
    (install)           -> .verified marker written last, then one rename into versions/
    update.switched     -> previous := current, current := new (each an atomic symlink replace)

Any failure emits ``update.failed`` (with the step and a one-line reason), raises :class:`UpdateError`, and never
touches ``current``. :meth:`Updater.rollback` swaps current and previous; :meth:`Updater.recover` (call it at
start-up) repairs what a crash left and says which verified version to start on.

Signed, monotonic identity (issue 13, :mod:`~edge_sdk.device_agent.update_guard`): the device never switches to
another model, or to a lower (or equal but different) ``version_code`` of its model, unless a rollback
authorisation signed by a trusted key names the change (step ``policy``). From MQTT only http(s) URLs with a
``size_bytes`` are accepted; the download stops at that size and keeps ``free_space_reserve_bytes`` free; the
archive's manifest signature and member list are checked before it is unpacked. ``cmd/rollback`` needs a signed
authorisation naming the version the device kept, and is carried out once (its ``command_id`` and the
authorisation are remembered across restarts). Refused commands emit ``update.refused``. URLs in events and logs
carry no credentials or query strings.

MQTT: :meth:`Updater.handle_command` takes ``cmd/update`` / ``cmd/rollback`` payloads and returns what happened;
:meth:`Updater.on_command` does the same on a worker thread (for the publisher's network thread, which must not
block). ``cmd/update`` is retained, so it is seen again after every reconnect: a model that is already current is
a no-op, and an update this device refused or rolled back is not retried for the same deployment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_sdk.bundle import MANIFEST_NAME, Bundle, sha256_file
from edge_sdk.device_agent.download import (
    DownloadError,
    copy_tree,
    fetch,
    is_remote,
    local_path,
    redact_text,
    redact_url,
)
from edge_sdk.device_agent.model_store import BUNDLE_DIR, ModelStore, RecoveryResult, UpdateError, VersionInfo
from edge_sdk.device_agent.update_commands import CommandHandling
from edge_sdk.device_agent.update_guard import Guard
from edge_sdk.errors import EdgeSDKError, first_line
from edge_sdk.mqtt import RateLimitedLog

__all__ = ["EventSink", "ModelStore", "RecoveryResult", "UpdateError", "Updater", "VersionInfo"]

log = logging.getLogger("edge_sdk.updater")
#: events a sender can trigger at will (refused or failed commands); their log lines are rate-limited
_FLOODABLE = frozenset({"update.failed", "update.refused"})
_refusal_log = RateLimitedLog(log)

EventSink = Callable[[str, dict[str, Any], str], Any]
"""``emit_event(kind, data, level)`` — e.g. ``Telemetry.emit_event``; level is info / warning / error."""

_TRANSIENT_STEPS = ("download",)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")  # failures worth retrying when the same command comes again


def _redact(source: str) -> str:
    """The URL without credentials or query string (for events and logs)."""
    return redact_url(source)


def _clean(value: Any) -> Any:
    """An event value with every URL in its text redacted (reasons quote download errors)."""
    if isinstance(value, str):
        return redact_text(value) if "://" in value else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class _Failed(Exception):
    """Internal: a step failed (carries the step name and the one-line reason)."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(reason)
        self.step, self.reason = step, reason


class Updater(CommandHandling):
    """Installs signed bundles into a :class:`ModelStore` and switches the device to them (module docstring).

    ``trusted_keys``: directory / file(s) of ed25519 public keys (``edge_sdk.signing``). Without keys, updates are
    refused unless ``allow_unsigned=True`` (development only: then the signature is not checked at all).
    ``runtime_order`` / ``artifact`` / ``threads`` are the device Agent's settings, used for the smoke test so it
    runs the artifact and runtime the device will really use. ``keep_old``: how many versions besides current and
    previous stay installed. ``on_switch(bundle_path)`` is called after every switch (update or rollback) to load
    the new model; if it raises an EdgeSDKError after an update, the update is rolled back. ``fleet``: this
    device's fleet (bundles whose signed manifest lists ``fleets`` install only there; rollback authorisations
    naming a fleet must name this one). ``max_download_bytes`` caps a download whose size nobody gave;
    ``free_space_reserve_bytes`` stay free on the store's disk after a download or unpack.
    """

    def __init__(self, store: ModelStore | str | os.PathLike, *,
                 trusted_keys: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 allow_unsigned: bool = False, emit_event: EventSink | None = None,
                 runtime_order: Sequence[str] | None = None, artifact: str | None = None, threads: int | None = 1,
                 keep_old: int = 1, require_smoke_test: bool = True,
                 on_switch: Callable[[Path], Any] | None = None, timeout_s: float = 30.0, retries: int = 5,
                 ca_file: str | os.PathLike | None = None, fleet: str | None = None,
                 max_download_bytes: int = 4 << 30, free_space_reserve_bytes: int = 64 << 20) -> None:
        self.store = store if isinstance(store, ModelStore) else ModelStore(store)
        if trusted_keys is None and not allow_unsigned:
            raise UpdateError("no trusted keys for model updates: pass trusted_keys=DIR (public keys from "
                              "`edge-sdk keys new`), or allow_unsigned=True for development only")
        if trusted_keys is not None:
            from edge_sdk.signing import load_public_keys

            load_public_keys(trusted_keys)  # fail now, not at the first update
        if keep_old < 0:
            raise UpdateError(f"keep_old must be >= 0, got {keep_old}")
        self.trusted_keys = trusted_keys
        self.allow_unsigned = allow_unsigned
        self.emit_event = emit_event
        self.runtime_order = list(runtime_order) if runtime_order else None
        self.artifact = artifact
        self.threads = threads
        self.keep_old = keep_old
        self.require_smoke_test = require_smoke_test
        self.on_switch = on_switch
        self.timeout_s = timeout_s
        self.retries = retries
        self.ca_file = ca_file
        self.max_download_bytes = max_download_bytes
        self.free_space_reserve_bytes = free_space_reserve_bytes
        self.guard = Guard(self.store, fleet)
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self.last_result: dict[str, Any] | None = None

    # ---- events ------------------------------------------------------------------------------------------------

    @property
    def fleet(self) -> str | None:
        """This device's fleet (checked against a bundle's signed ``fleets`` and an authorisation's fleet)."""
        return self.guard.fleet

    @fleet.setter
    def fleet(self, value: str | None) -> None:
        self.guard.fleet = value

    def _emit(self, kind: str, data: dict[str, Any], level: str = "info") -> None:
        data = _clean(data)
        lvl = logging.ERROR if level == "error" else logging.INFO
        if kind in _FLOODABLE:  # refusals: one line per kind and step a minute, so a command flood cannot fill a disk
            _refusal_log(lvl, f"{kind}:{data.get('step') or data.get('command') or ''}", "%s %s", kind, data)
        else:
            log.log(lvl, "%s %s", kind, data)
        if self.emit_event is None:
            return
        try:
            self.emit_event(kind, data, level)
        except EdgeSDKError as exc:  # reporting must never break an update
            log.warning("could not emit event %s: %s", kind, exc)

    # ---- start-up ----------------------------------------------------------------------------------------------

    def recover(self, *, deep: bool = True) -> RecoveryResult:
        """Repair the store after a crash and choose the verified version to start on (call at start-up)."""
        res = self.store.recover(deep=deep)
        if res.changed:
            self._emit("update.recovered", {"to": res.version.label if res.version else None, "reason": res.reason},
                       "warning")
        return res

    def current_bundle(self) -> Path | None:
        """The bundle directory of the current version if it is marked verified (quick check), else None."""
        info, _ = self.store.check(self.store.link("current"), deep=False)
        return info.bundle_path if info else None

    def status(self) -> dict[str, Any]:
        """Current / previous / installed versions and the last failure (for health endpoints)."""
        state = self.store.read_state()
        cur, prev = (self.store.info(d) if d else None for d in (self.store.link("current"),
                                                                 self.store.link("previous")))
        return {"current": cur.label if cur else None, "previous": prev.label if prev else None,
                "installed": [i.dir_name for i in self.store.versions()],
                "last_failure": (state.get("failures") or [None])[-1]}

    # ---- update ------------------------------------------------------------------------------------------------

    def update(self, url_or_path: str | os.PathLike, *, expected_sha256: str | None = None,
               expected_size: int | None = None, name: str | None = None, version: str | None = None,
               deployment_id: str | None = None, authorisation: dict[str, Any] | None = None) -> Path:
        """Download, verify, smoke-test and switch to a bundle archive (http(s)/file URL or path; a bundle
        directory also works). Returns the new current bundle directory; raises UpdateError (current untouched).
        ``authorisation``: a verified rollback authorisation statement, needed to go to another model or a lower
        version_code (:meth:`handle_command` verifies the signed document)."""
        src = str(url_or_path)
        if expected_sha256 is not None and not _SHA256.fullmatch(str(expected_sha256)):
            reason = f"expected sha256 {str(expected_sha256)[:80]!r} is not 64 hex digits: fix the update command"
            self._emit("update.failed", {"source": _redact(src), "deployment_id": deployment_id, "step": "command",
                                         "reason": reason}, "error")
            raise UpdateError(reason)
        expected_sha256 = expected_sha256.lower() if expected_sha256 else None
        ctx: dict[str, Any] = {"source": _redact(src), "deployment_id": deployment_id}
        step = "download"
        work: Path | None = None
        part: Path | None = None
        used: list[bool] = []
        with self.store.lock():
            try:
                info = self.store.find(archive_sha256=expected_sha256) if expected_sha256 else None
                if info is not None:
                    self._emit("update.downloaded", {**ctx, "cached": True, "version": info.label})
                    self._policy(Bundle.load(info.bundle_path).manifest, info.manifest_sha256, authorisation, used)
                else:
                    work = self.store.new_work_dir("update")
                    local = None if is_remote(src) else local_path(src)
                    if local is None or not local.is_dir():
                        pid = (expected_sha256 or hashlib.sha256(src.encode()).hexdigest())[:16].lower()
                        part = self.store.staging_dir / f"{pid}.part"
                    dir_name = self._prepare(src, work, part, ctx, expected_sha256, expected_size, name, version,
                                             authorisation, used)
                    step = "install"
                    info = self.store.install(work, dir_name)
                    work = None
                step = "switch"
                changed, old = self.store.switch(info)
            except _Failed as exc:
                self._fail(exc.step, exc.reason, ctx, work, part, expected_sha256)
            except (EdgeSDKError, OSError) as exc:
                self._fail(step, first_line(exc), ctx, work, part, expected_sha256)
            if changed:
                auth_id = {"authorisation": authorisation["id"]} if authorisation and any(used) else {}
                self._emit("update.switched", {**ctx, "from": old.label if old else None, "to": info.label,
                                               "dir": info.dir_name, **auth_id})
                if auth_id:
                    self.guard.remember(authorisation=authorisation)
            else:
                self._emit("update.skipped", {**ctx, "version": info.label, "reason": "already current"})
            try:  # bookkeeping after the switch: a failure here does not undo a good update
                if part is not None:
                    for p in (part, part.with_name(part.name + ".json")):
                        p.unlink(missing_ok=True)
                if changed:
                    self.store.record({"action": "switched", "from": old.dir_name if old else None,
                                       "to": info.dir_name, "deployment_id": deployment_id})
                removed = self.store.gc(self.keep_old)
                if removed:
                    log.info("removed old versions: %s", ", ".join(removed))
            except OSError as exc:
                log.warning("after switching to %s: could not clean up or record the update (%s)", info.label,
                            first_line(exc))
            if changed and self.on_switch is not None:
                self._activate(info, old, ctx, expected_sha256)
        return info.bundle_path

    def _activate(self, info: VersionInfo, old: VersionInfo | None, ctx: dict[str, Any],
                  expected_sha256: str | None) -> None:
        """Call ``on_switch``; if the new model does not start, roll back to the old one and fail the update."""
        try:
            self.on_switch(info.bundle_path)  # type: ignore[misc]
        except EdgeSDKError as exc:
            reason = f"the new model failed to start: {first_line(exc)}"
            if old is not None:
                self.store.rollback()
                self._emit("update.rolled_back", {**ctx, "from": info.label, "to": old.label, "reason": reason},
                           "warning")
                self.on_switch(old.bundle_path)  # type: ignore[misc]
            self._fail("activate", reason, ctx, None, None, expected_sha256)

    def _policy(self, m: Any, manifest_sha: str, authorisation: dict[str, Any] | None, used: list[bool]) -> None:
        """Raise _Failed("policy") unless the device may switch to this signed manifest (update_guard)."""
        if self.trusted_keys is None:  # development mode: no signatures, so no identity to keep
            return
        cur_dir = self.store.link("current")
        problem, needed = self.guard.bundle_problem(m, manifest_sha, self.store.info(cur_dir) if cur_dir else None,
                                                    authorisation)
        if problem:
            raise _Failed("policy", problem)
        used.append(needed)

    def _prepare(self, src: str, work: Path, part: Path | None, ctx: dict[str, Any], expected_sha256: str | None,
                 expected_size: int | None, name: str | None, version: str | None,
                 authorisation: dict[str, Any] | None = None, used: list[bool] | None = None) -> str:
        """Download (into ``part``; None: copy the bundle directory ``src``), unpack, verify and smoke-test into
        ``work``; write the marker. Returns the version's directory name."""
        bundle_dir = work / BUNDLE_DIR
        archive_sha = None
        t0 = time.monotonic()
        try:
            if part is None:
                self._emit("update.downloading", {**ctx, "resume_from": 0})
                copy_tree(local_path(src), bundle_dir)
                self._emit("update.downloaded", {**ctx, "bytes": None, "seconds": round(time.monotonic() - t0, 3)})
            else:
                self.store.clean_staging(keep={part.name, f"{part.name}.json", work.name}, keep_parts=False)
                have = part.stat().st_size if part.exists() else 0
                self._emit("update.downloading", {**ctx, "resume_from": have, "expected_bytes": expected_size})
                res = fetch(src, part, expected_sha256=expected_sha256, expected_size=expected_size,
                            timeout=self.timeout_s, retries=self.retries, ca_file=self.ca_file,
                            max_bytes=self.max_download_bytes, reserve_bytes=self.free_space_reserve_bytes)
                archive_sha = res.sha256
                self._emit("update.downloaded", {**ctx, "bytes": res.size, "sha256": res.sha256,
                                                 "resumed_from": res.resumed_from, "attempts": res.attempts,
                                                 "seconds": round(time.monotonic() - t0, 3)})
        except (DownloadError, OSError) as exc:
            raise _Failed("download", first_line(exc)) from None
        if part is not None and self.trusted_keys is not None and not self.allow_unsigned:
            from edge_sdk.signing import verify_archive_manifest

            try:  # signature and member list first: nothing unsigned or unlisted is written to the disk
                verify_archive_manifest(part, self.trusted_keys)
            except EdgeSDKError as exc:
                raise _Failed("verify", first_line(exc, 600)) from None
        try:
            if part is not None:
                Bundle.extract(part, bundle_dir, reserve_bytes=self.free_space_reserve_bytes)
        except EdgeSDKError as exc:
            raise _Failed("unpack", first_line(exc)) from None
        try:
            key_id = self._verify_signature(bundle_dir)  # checks every file against the signed manifest
            bundle = Bundle.load(bundle_dir)
            if key_id is None:
                bundle.verify()
        except EdgeSDKError as exc:
            raise _Failed("verify", first_line(exc)) from None
        m = bundle.manifest
        wrong = [f"{what} {got!r} (the command says {want!r})" for what, want, got in
                 (("name", name, m.name), ("version", version, m.version)) if want is not None and str(want) != got]
        if wrong:
            raise _Failed("verify", f"the bundle has {' and '.join(wrong)}: refusing it")
        manifest_sha = sha256_file(bundle_dir / MANIFEST_NAME)
        self._policy(m, manifest_sha, authorisation, used if used is not None else [])
        self._emit("update.verified", {**ctx, "name": m.name, "version": m.version, "key_id": key_id,
                                       "signed": key_id is not None, "manifest_sha256": manifest_sha})
        smoke = self._smoke(bundle, ctx)
        self.store.mark_verified(work, {"name": m.name, "version": m.version, "manifest_sha256": manifest_sha,
                                        "archive_sha256": archive_sha, "key_id": key_id, "source": ctx["source"],
                                        "deployment_id": ctx["deployment_id"], "smoke_test": smoke})
        return ModelStore.dir_name(m.name, m.version, manifest_sha)

    def _verify_signature(self, bundle_dir: Path) -> str | None:
        from edge_sdk.signing import SIGNATURE_NAME, verify_bundle

        if self.trusted_keys is None:  # allow_unsigned=True and no keys: development mode
            log.warning("signature NOT checked for %s (allow_unsigned without trusted keys)", bundle_dir)
            return None
        if self.allow_unsigned and not (bundle_dir / SIGNATURE_NAME).exists():
            log.warning("accepting unsigned bundle %s (allow_unsigned)", bundle_dir)
            return None
        return verify_bundle(bundle_dir, self.trusted_keys)

    def _smoke(self, bundle: Bundle, ctx: dict[str, Any]) -> dict[str, Any] | None:
        from edge_sdk.device_agent.smoke import run_smoke_test

        if not self.require_smoke_test and not bundle.manifest.extra.get("smoke_test"):
            self._emit("update.smoke_test", {**ctx, "passed": None, "reason": "bundle has no smoke sample"},
                       "warning")
            return None
        try:
            res = run_smoke_test(bundle, runtime_order=self.runtime_order, artifact=self.artifact,
                                 threads=self.threads)
        except EdgeSDKError as exc:
            raise _Failed("smoke_test", first_line(exc)) from None
        self._emit("update.smoke_test", {**ctx, **res.to_dict()}, "info" if res.passed else "error")
        if not res.passed:
            raise _Failed("smoke_test", res.reason)
        return res.to_dict()

    def _fail(self, step: str, reason: str, ctx: dict[str, Any], work: Path | None, part: Path | None,
              expected_sha256: str | None) -> None:
        reason = redact_text(reason)
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if part is not None and step not in _TRANSIENT_STEPS:  # the content is bad: do not resume it later
            for p in (part, part.with_name(part.name + ".json")):
                p.unlink(missing_ok=True)
        cur = self.store.link("current")
        self.store.record({"action": "failed", "step": step, "reason": reason, "sha256": expected_sha256,
                           "deployment_id": ctx.get("deployment_id"), "transient": step in _TRANSIENT_STEPS,
                           "current": cur.name if cur is not None and step == "policy" else None},
                          failure=True)
        self._emit("update.failed", {**ctx, "step": step, "reason": reason}, "error")
        raise UpdateError(f"update from {ctx['source']} failed at {step}: {reason}")

    # ---- rollback ----------------------------------------------------------------------------------------------

    def rollback(self, *, reason: str = "requested", authorisation: dict[str, Any] | None = None) -> Path:
        """Switch back to the previous version (swapping current and previous). Returns the new current bundle.

        This is the local, trusted API (e.g. the agent's start-up when a new model does not load);
        ``cmd/rollback`` from MQTT goes through :meth:`handle_command`, which needs a signed authorisation."""
        with self.store.lock():
            try:
                new, old = self.store.rollback()
            except UpdateError as exc:
                self._emit("update.failed", {"step": "rollback", "reason": str(exc)}, "error")
                raise
            self.store.record({"action": "rolled_back", "from": old.dir_name if old else None, "to": new.dir_name,
                               "reason": reason, "deployment_id": old.marker.get("deployment_id") if old else None,
                               "sha256": old.archive_sha256 if old else None})
            auth_id = {"authorisation": authorisation["id"]} if authorisation else {}
            self._emit("update.rolled_back", {"from": old.label if old else None, "to": new.label, "reason": reason,
                                              **auth_id}, "warning")
        if self.on_switch is not None:
            self.on_switch(new.bundle_path)
        return new.bundle_path

    # ---- MQTT commands -----------------------------------------------------------------------------------------

    def on_command(self, name: str, payload: dict[str, Any]) -> None:
        """Queue a command for :meth:`handle_command` on the updater's worker thread and return at once (use this
        as the MQTT publisher's ``on_command``: its network thread must not block on a download)."""
        if name not in ("update", "rollback"):
            return
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._run_worker, name="edge-updater", daemon=True)
            self._worker.start()
        self._queue.put((name, payload))

    def _run_worker(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self.handle_command(*item)
            except Exception:  # the worker is a long-running service loop: log, keep serving commands
                log.exception("updater command %s failed unexpectedly", item[0] if item else None)
            finally:
                self._queue.task_done()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until queued commands are done (True) or ``timeout`` seconds passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker thread after the commands already queued."""
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
            self._worker.join(timeout)
        self._worker = None
