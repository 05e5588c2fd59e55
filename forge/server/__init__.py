"""The OpenAI-compatible HTTP server (`forge serve`): api_server (routes), serving (completions and
chat), protocol (request bodies), async_engine (the engine's step thread), metrics (Prometheus)."""
