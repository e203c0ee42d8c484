"""Fixtures of the integration tests that more than one file uses."""

from __future__ import annotations

import pytest
from support.caps import check_kvm
from support.qprobe import HostDaemon


@pytest.fixture
def daemon(tmp_path):
    check_kvm()
    made: list[HostDaemon] = []

    def start(**cfg: object) -> HostDaemon:
        made.append(HostDaemon(tmp_path, **cfg))
        return made[-1]

    yield start
    for d in made:
        d.stop()
