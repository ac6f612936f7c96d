"""Helpers for tests and benchmarks: tiny random models in the real single-file layout."""
