"""Dashboard pages: each module exposes ``routes() -> list[BaseRoute]`` (see ``app.py``)."""
