"""Serving: the continuous-batching engine (``Engine``, ``Request``, ``Output``, ``QueueFull``) and its host-side
prefix cache."""
from .engine import Engine, Output, QueueFull, Request

__all__ = ["Engine", "Output", "QueueFull", "Request"]
