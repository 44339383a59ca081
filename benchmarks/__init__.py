"""Benchmarks: ``python -m benchmarks.<name>`` from the repository root; each measures, prints a table
and writes it under ``results/bench/`` (not timed tests: docs/architecture.md, "Conventions")."""
