"""Benchmarks of the VGS kernels and of the VGS training step (docs/kernels.md; results in README).

Entry points: ``python -m benchmarks.kernels``, ``python -m benchmarks.step``,
``python -m benchmarks.report`` and ``pytest benchmarks/ --benchmark-only``.
"""
