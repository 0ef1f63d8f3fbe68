"""Postgres (or embedded SQLite) persistence: tables and the queries the service uses."""
