import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # helpers for tests in subfolders

import pytest  # noqa: E402

from vgs_kernels import driver  # noqa: E402


class GatedRowCounter:
    """Stands in for ``driver.gated_rows``: counts the rows the driver's pass 2 recomputes."""

    def __init__(self, real):
        self.real, self.rows = real, 0

    def __call__(self, coef):
        idx = self.real(coef)
        self.rows += idx.numel()
        return idx


@pytest.fixture
def pass2(monkeypatch) -> GatedRowCounter:
    """The driver's ``gated_rows`` wrapped for the test: ``pass2.rows`` is how many rows pass 2 recomputed."""
    count = GatedRowCounter(driver.gated_rows)
    monkeypatch.setattr(driver, "gated_rows", count)
    return count
