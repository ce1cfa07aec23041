"""Fixtures shared by the vgs_train tests: one embedded-default cache (prepared once per session for the
tiny settings of ``train_helpers.TINY``) and one tiny world for the tools' oracles."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_helpers for tests in subfolders

from train_helpers import build_world  # noqa: E402


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("embedded_cache"))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Random tiny teacher and student on 8 synthetic rows (read-only: tests never step their weights)."""
    return build_world(tmp_path_factory.mktemp("world"))
