from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("v1/chat/completions", views.chat_completions),
    path("admin/fail", views.fail),
    path("admin/recover", views.recover),
]
