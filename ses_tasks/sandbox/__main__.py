"""``python -m ses_tasks.sandbox``."""

from __future__ import annotations

from ses_tasks.sandbox.cli import main

raise SystemExit(main())
