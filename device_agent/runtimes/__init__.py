"""Inference runtimes, one module each, behind the :class:`Runtime` protocol."""

from __future__ import annotations

from edge_sdk.device_agent.runtimes.base import Runtime, Session, dequantize, quantize

__all__ = ["Runtime", "Session", "dequantize", "quantize"]
