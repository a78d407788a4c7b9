"""The index contract suites run over both adapters' databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vna.adapters.index.sqlalchemy import SqlIndex


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty index database of either kind (for migration tests)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    url: str = request.getfixturevalue("fresh_postgres_url")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SqlIndex]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    idx = SqlIndex.from_url(url)
    yield idx
    idx.close()
