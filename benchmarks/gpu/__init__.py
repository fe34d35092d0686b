"""The GPU check: prepared here (``prepare``), run in one command on a GPU machine (``benchmarks/gpu_check.sh``)."""
