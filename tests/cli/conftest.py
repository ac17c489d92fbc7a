"""Fixtures the CLI tests share."""

from __future__ import annotations

import pytest


@pytest.fixture
def home(tmp_path):
    """An empty ``$THINPOOL_HOME`` (it does not exist yet); modules that need pools in it
    define their own ``home``."""
    return tmp_path / "home"
