"""The OpenAI-compatible server: engine, prefix cache, protocol."""
