"""Helpers for tests and benchmarks (synthetic data, test servers)."""
