"""Step *register* (sign + register): sign the accepted bundle, add it to the registry, promote it, record lineage.

With ``[sign] key`` the bundle is signed (:func:`edge_sdk.signing.sign_bundle`); the registry verifies it against
``[registry] trusted_keys`` when given. The combined holdout of the evaluate step becomes the model's registered
holdout and :meth:`~edge_sdk.fleet.lifecycle.registry.Registry.promote` runs the registry's own gate on it
(tolerance ``[evaluate] max_loss_pp``), moving the version to ``canary``. The new model's source file is kept
beside the archive (``<registry dir>/<name>/<version>.source.<ext>``) so the next run can fine-tune it.

The version's lineage gets ``pipeline``: run id, config, trigger, the source model and every step's inputs,
outputs (with hashes) and figures (``edge-sdk registry show NAME:VERSION``).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from edge_sdk.pipeline.context import StepContext, file_ref
from edge_sdk.pipeline.errors import PipelineError

__all__ = ["STEPS_IN_LINEAGE", "lineage_of", "run"]

STEPS_IN_LINEAGE = ("gather", "train", "convert", "evaluate", "register", "deploy")


def lineage_of(ctx: StepContext, source_model: dict[str, Any] | None) -> dict[str, Any]:
    """The ``pipeline`` lineage entry from the step records present in the work directory."""
    steps = {}
    for step in STEPS_IN_LINEAGE:
        path = ctx.workdir / step / f"{step}.json"
        if path.is_file():
            rec = ctx.record(step)
            steps[step] = {k: rec.get(k) for k in ("inputs", "outputs", "figures", "started_at", "seconds")}
    cfg = ctx.config
    return {"run_id": ctx.run_id, "workdir": str(ctx.workdir), "trigger": ctx.trigger,
            "config": {"path": str(cfg.path) if cfg.path else None, "sha256": cfg.sha256},
            "source_model": source_model, "steps": steps}


def run(ctx: StepContext) -> dict[str, Any]:
    """Run the register step (module doc); return its record."""
    started, t0 = time.time(), time.perf_counter()
    cfg = ctx.config
    converted, evaluated, trained = ctx.record("convert"), ctx.record("evaluate"), ctx.record("train")
    if not evaluated["figures"].get("accepted"):
        raise PipelineError("the evaluate step refused this version: it is not registered (see evaluate.json)")
    bundle = Path(converted["outputs"]["bundle"]["path"])
    name, version = converted["outputs"]["name"], converted["outputs"]["version"]
    key_id = None
    if cfg.sign_key is not None:
        from edge_sdk.signing import sign_bundle

        key_id = sign_bundle(bundle, cfg.sign_key)
    reg = ctx.registry
    rec = reg.add(bundle)
    model = trained["outputs"]["model"]
    src = Path(model["path"])
    dest = Path(reg.store_dir or cfg.registry.dir) / name / f"{version}.source{''.join(src.suffixes)}"
    if src.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
    else:
        shutil.copyfile(src, dest)
    source_model = {**file_ref(dest), "model_class": model.get("model_class")}
    hold = reg.register_holdout(name, evaluated["outputs"]["holdout"]["path"])
    promo = reg.promote(name, version, tolerance_pp=cfg.evaluate.max_loss_pp,
                        allow_unsigned=cfg.registry.allow_unsigned)
    out = ctx.write_record("register", started, t0=t0,
                           inputs={"bundle": converted["outputs"]["bundle"], "sign_key": str(cfg.sign_key)
                                   if cfg.sign_key else None},
                           outputs={"model": rec.ref, "state": promo.record.state, "archive": rec.archive_path,
                                    "bundle_sha256": rec.bundle_sha256, "source_model": source_model},
                           figures={"signed_key_id": key_id, "signature_verified": rec.signature_verified,
                                    "holdout_sha256": hold.sha256, "holdout_samples": hold.samples,
                                    "registry_gate": promo.decision.reason,
                                    "registry_gate_delta_pp": promo.decision.figures.get("delta_pp")})
    reg.record_lineage(name, version, "pipeline", lineage_of(ctx, source_model))
    return out
