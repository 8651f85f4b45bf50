"""Optimize without losing what the model knows: structured / magnitude pruning and knowledge distillation
(PyTorch). torch is imported inside the functions that need it (extra ``torch``)."""

from edge_sdk.optimize.distill import DistillResult, distill
from edge_sdk.optimize.prune import PruneError, PruneReport, PruneResult, prune

__all__ = ["DistillResult", "PruneError", "PruneReport", "PruneResult", "distill", "prune"]
