"""A web dashboard for ses-tasks: campaigns, suppression, limits and workers.

``ses-tasks dashboard`` serves it; ``create_app()`` is the ASGI app for any server or to mount
in an existing ASGI app (``Mount("/ses", app=create_app())``).
"""

from ses_tasks.dashboard.app import DashboardContext, create_app
from ses_tasks.dashboard.security import DashboardAuth, check_bind

__all__ = ["DashboardAuth", "DashboardContext", "check_bind", "create_app"]
