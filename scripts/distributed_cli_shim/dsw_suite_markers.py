"""A pytest plugin for running distributed's CLI tests outside distributed's CI.

distributed's tests mark some tests `flaky` (pytest-rerunfailures' marker) and run with
--strict-markers. That plugin is no dependency of this project, so the marker is only
registered here: such a test runs once, in both runs alike, instead of failing to collect.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "flaky: rerun marker of pytest-rerunfailures (not rerun)")
