"""Benchmarks of the VGS kernels and of the VGS training step (SPEC.md section 5).

Entry points: ``python -m benchmarks.kernels``, ``python -m benchmarks.step``,
``python -m benchmarks.report`` and ``pytest benchmarks/ --benchmark-only``.
"""
