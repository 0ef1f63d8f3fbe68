"""Acceptance tests: the real `dispatcher` processes over real HTTP, Postgres and Redis."""
