"""The retraining pipeline (issue 18): gather -> train -> convert -> evaluate -> sign + register -> deploy.

Each step reads files from the run's work directory and writes its own (``<workdir>/<step>/``), so any scheduler
can run them one by one (``edge-sdk pipeline run pipeline.toml --only STEP --workdir DIR``); :func:`run_pipeline`
runs them in order under a per-model lock and records the outcome in ``<workdir>/run.json``. Every step's inputs,
outputs (sha256) and figures become the new registry version's lineage. :class:`PipelineServer` starts runs from
the collector's alert webhook. See :mod:`edge_sdk.pipeline.config` for pipeline.toml.
"""

from __future__ import annotations

from edge_sdk.pipeline.config import PipelineConfig, load_config, parse_config
from edge_sdk.pipeline.errors import GateRefused, PipelineBusy, PipelineConfigError, PipelineError
from edge_sdk.pipeline.runner import STEPS, RunResult, run_pipeline, steps_to_run
from edge_sdk.pipeline.train import TrainingData

__all__ = ["STEPS", "GateRefused", "PipelineBusy", "PipelineConfig", "PipelineConfigError", "PipelineError",
           "RunResult", "TrainingData", "load_config", "parse_config", "run_pipeline", "steps_to_run"]
