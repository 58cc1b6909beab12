"""Celery: the app (no environment read at import), tasks, publishing."""
