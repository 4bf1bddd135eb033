"""Settings for the Django example: no database, no contrib apps, nothing but one view module."""

from __future__ import annotations

import os

# For the example only: a real project reads its secret from the environment.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "tier-middleware-example-not-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"]

ROOT_URLCONF = "examples.django_project.urls"
INSTALLED_APPS: list[str] = []
# No CSRF middleware: the endpoints are a JSON API called by programs, not by browsers.
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}

USE_TZ = True
