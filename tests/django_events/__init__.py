"""A minimal Django project for the worker-side signal test: its app connects receivers
in ``AppConfig.ready()``, as a real project does."""
