"""sandbox-kernel benchmarks: ``python -m benchmarks`` prints a table and writes JSON."""
