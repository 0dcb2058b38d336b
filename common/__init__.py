"""Shared foundation for the five methods: models, pipelines, attention, rendering, training, IO, CLI."""
from common.errors import UsageError

__all__ = ["UsageError"]
