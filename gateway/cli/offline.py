"""Verbs that need no running gateway: `flags validate`, offline `assign`."""

from __future__ import annotations
