"""Step *train*: call the user's ``module:function`` with the gathered data and the current model; save its result.

The entry point is called as ``fn(data, current_model, **params)``: ``data`` a :class:`TrainingData` (the
training rows only: the original data plus the labelled samples outside the holdout — the holdouts stay unseen),
``current_model`` the path of the current version's source model (from its lineage, else ``[model] source``;
None when neither is known). It returns the new model: a ``torch.nn.Module`` (saved as a state_dict, converted
with the model class the current version was converted with), a path to a saved model file (copied), or a
``(model, figures)`` pair whose figures (a dict) are recorded.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.pipeline.context import StepContext, file_ref, import_entry, on_path
from edge_sdk.pipeline.errors import PipelineError

__all__ = ["TrainingData", "current_source_model", "run"]


@dataclass(frozen=True)
class TrainingData:
    """What the train entry point receives: the training rows of the gathered snapshot."""

    inputs: np.ndarray
    labels: np.ndarray
    is_sample: np.ndarray  # True for rows that came from exported device samples
    path: Path  # gather/data.npz
    sha256: str  # the snapshot hash (gather.json figures.data_sha256)
    workdir: Path  # train/: where the entry point may write files

    def __len__(self) -> int:
        return len(self.labels)


def current_source_model(ctx: StepContext) -> dict[str, Any] | None:
    """``{"path", "sha256", "model_class"}`` of the current version's source model, or None."""
    current = ctx.current()
    src = (current.lineage.get("pipeline") or {}).get("source_model")
    if isinstance(src, dict) and src.get("path") and Path(src["path"]).exists():
        return src
    if ctx.config.model.source is not None:
        if not ctx.config.model.source.exists():
            raise PipelineError(f"[model] source {ctx.config.model.source} not found: give the current version's "
                                "source model file")
        return {**file_ref(ctx.config.model.source), "model_class": None}
    return None


def _model_class(ctx: StepContext, model: Any) -> str:
    recorded = (ctx.current().manifest.get("extra") or {}).get("conversion") or {}
    if recorded.get("model_class"):
        return str(recorded["model_class"])
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def run(ctx: StepContext) -> dict[str, Any]:
    """Run the train step (module doc); return its record."""
    started, t0 = time.time(), time.perf_counter()
    cfg = ctx.config
    gathered = ctx.record("gather")
    data_path = Path(gathered["outputs"]["data"]["path"])
    if not data_path.is_file():
        raise PipelineError(f"{data_path} not found: run the gather step first")
    with np.load(data_path, allow_pickle=False) as npz:
        data = TrainingData(npz["train_inputs"], npz["train_labels"], npz["train_is_sample"], data_path,
                            gathered["figures"]["data_sha256"], ctx.dir("train"))
    current = current_source_model(ctx)
    fn = import_entry(cfg.train.entry, cfg.train.path)
    try:
        with on_path(cfg.train.path):
            result = fn(data, Path(current["path"]) if current else None, **cfg.train.params)
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"[train] entry {cfg.train.entry} raised {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    figures: dict[str, Any] = {}
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict):
        result, figures = result
    out_dir = ctx.dir("train")
    model_class = None
    if isinstance(result, (str, Path)):
        src = Path(result)
        if not src.exists():
            raise PipelineError(f"[train] entry {cfg.train.entry} returned {src}, which does not exist")
        dest = out_dir / f"model{''.join(src.suffixes) or ''}"
        if src.resolve() != dest.resolve():
            if src.is_dir():
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(src, dest)
            else:
                shutil.copyfile(src, dest)
        if current and current.get("model_class"):
            model_class = current["model_class"]
    elif type(result).__module__.startswith("torch") or any(
            c.__module__.startswith("torch.nn") for c in type(result).__mro__):
        import torch

        dest = out_dir / "model.pt"
        torch.save(result.state_dict(), dest)
        model_class = _model_class(ctx, result)
    else:
        raise PipelineError(f"[train] entry {cfg.train.entry} returned {type(result).__name__}: return a torch "
                            "module, a saved model path, or (model, figures)")
    figures = {**{k: v for k, v in figures.items() if isinstance(v, (int, float, str, bool, list, dict))},
               "train_rows": len(data), "sample_rows": int(data.is_sample.sum())}
    return ctx.write_record("train", started, t0=t0,
                            inputs={"data": gathered["outputs"]["data"], "current_model": current,
                                    "entry": cfg.train.entry, "params": cfg.train.params},
                            outputs={"model": {**file_ref(dest), "model_class": model_class}}, figures=figures)
