"""Benchmark sets, the evaluation runner, result tables, and one script per speed goal."""
