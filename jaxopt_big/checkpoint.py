"""Orbax checkpoints (being built)."""

__all__: list[str] = []
