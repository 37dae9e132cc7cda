"""Benchmarks: the model suite (run.py, report.py) and its sub-benchmarks."""
