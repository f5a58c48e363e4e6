"""``nemojax serve``: an OpenAI-compatible HTTP server (``server``, ``protocol``) over a continuous-batching engine."""
