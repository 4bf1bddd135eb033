"""Django's asgi.py, in short: the middleware is built when uvicorn imports this module."""

from config_apps import django

application = django()
