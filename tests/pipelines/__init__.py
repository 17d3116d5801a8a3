"""Pipelines the tests run beside the shipped examples (tests/cases.py)."""
