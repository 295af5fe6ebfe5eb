"""Throughput benchmarks of bn_cuda against PyTorch's batch norm; run with `python -m bench`.

Modules: shapes (presets), impls (bn_cuda and the baselines), passes (what one call does),
timing (warm-up, interleaved samples), bandwidth (byte model and copy bandwidth), runner (the
measurement loop), records (result types), machine (device and metadata), report (table, CSV,
JSON), plot (speedup.png), cli (the command line).
"""
