"""Loopback peers for the tests: llm-katan, a live uvicorn server, free ports."""
