"""Embedded models and synthetic tasks that need no download."""

from .easyvqa_hr import easyvqa_hr, easyvqa_hr_records
