"""pytest-benchmark suites of mipnet_kernels (``pytest benchmarks/``); see benchmarks/results/README.md."""
