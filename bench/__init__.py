"""Benchmarks: scripts that print a table and write JSON (see bench/README.md)."""
