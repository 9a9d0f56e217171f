"""Embedded models and synthetic tasks that need no download."""
