"""Helpers for tests and benchmarks (synthetic and benchmark slides); not part of the installed package."""
