"""Serving users' adapters over an OpenAI-compatible HTTP API (no Dagster)."""
