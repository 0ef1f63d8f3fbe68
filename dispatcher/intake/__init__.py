"""Intake: the HTTP API (and later alert adapters and batch files)."""
