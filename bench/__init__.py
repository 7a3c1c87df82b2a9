"""Benchmarks: `python -m bench.<name> --help`; shared timing/memory/CSV helpers in bench.harness."""
