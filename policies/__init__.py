"""Policies are data: config.yaml parsed into frozen objects, and pure decisions on scores.

Nothing here imports torch or httpx, so every rule is table-tested without a model.
"""
