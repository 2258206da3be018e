"""The benchmarks: scripts run from the checkout's root (``python benchmarks/run.py --out ...``), and the modules
they share with the tests (``_timing``, ``_peers``, ``_accelerators``, ``_accelerator_cases``), imported as
``benchmarks._<name>``."""
