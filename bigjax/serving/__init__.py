"""Serving a trained run: the engine (continuous batching over decode slots) and its
compiled programs, which the core uses too (benchmark generation during training), and the
OpenAI-compatible HTTP API around them (a tool)."""
