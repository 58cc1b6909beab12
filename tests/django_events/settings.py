"""``DJANGO_SETTINGS_MODULE=tests.django_events.settings``."""

SECRET_KEY = "test-only"
INSTALLED_APPS = ["tests.django_events"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
