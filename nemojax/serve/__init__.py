"""Serving: the continuous-batching engine (``Engine``, ``Request``, ``Output``, ``QueueFull``), its host-side
prefix cache, and the OpenAI-compatible HTTP server over them (``server``, ``protocol``; ``nemojax serve``)."""
from .engine import Engine, Output, QueueFull, Request

__all__ = ["Engine", "Output", "QueueFull", "Request"]
