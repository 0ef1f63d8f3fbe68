"""Celery: the app, its configuration and thin tasks that take intent ids."""
