"""siren-proxy's HTTP side: an OpenAI-compatible reverse proxy that calls a Scorer."""
