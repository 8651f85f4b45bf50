"""The pipeline's exceptions (all :class:`~edge_sdk.errors.EdgeSDKError`, messages one line: what, then how to fix)::

    EdgeSDKError
    └── PipelineError           a step cannot run or failed (bad pipeline.toml, missing input, a failing entry point)
        ├── PipelineConfigError (ConfigError)   pipeline.toml is wrong: names the file and the key
        ├── PipelineBusy        another run of the same model holds the lock
        └── GateRefused         the new version does not beat the current one: never registered nor deployed
"""

from __future__ import annotations

from typing import Any

from edge_sdk.errors import ConfigError, EdgeSDKError

__all__ = ["GateRefused", "PipelineBusy", "PipelineConfigError", "PipelineError"]


class PipelineError(EdgeSDKError):
    """A pipeline step cannot run or failed."""


class PipelineConfigError(PipelineError, ConfigError):
    """pipeline.toml is malformed or names something that does not exist (the message names the key)."""


class PipelineBusy(PipelineError):
    """Another run of the same model is in progress (one run at a time per model)."""


class GateRefused(PipelineError):
    """The evaluation gate refused the new version; ``figures`` holds what the decision rests on."""

    def __init__(self, message: str, figures: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.figures = figures or {}
