"""Model lifecycle: registry, evaluation gate, staged rollout, canary judgement, device commands, bundle server."""

__all__: list[str] = []
