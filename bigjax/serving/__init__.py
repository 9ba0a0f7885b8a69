"""Serving a trained run: the engine (continuous batching over decode slots), its compiled programs, and the OpenAI-compatible HTTP API around it."""
