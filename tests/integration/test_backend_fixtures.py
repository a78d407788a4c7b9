"""The real-backend fixtures themselves: isolation and the fail-or-skip policy."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.conftest import backend_missing


def test_missing_backend_fails_with_how_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VNA_TEST_ALLOW_SKIP", raising=False)
    monkeypatch.delenv("VNA_TEST_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.fail.Exception, match="start it: redis-server"):
        backend_missing("redis", "127.0.0.1:6379: Connection refused")


def test_missing_backend_skips_only_when_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNA_TEST_ALLOW_SKIP", "1")
    monkeypatch.delenv("VNA_TEST_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="rabbitmq-server"):
        backend_missing("rabbitmq", "refused")


def test_ci_requirement_wins_over_skipping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VNA_TEST_ALLOW_SKIP", "1")
    monkeypatch.setenv("VNA_TEST_REQUIRE_ALL", "1")
    with pytest.raises(pytest.fail.Exception):
        backend_missing("postgresql", "refused")


@pytest.mark.integration
def test_postgres_databases_are_fresh_and_separate(
        new_postgres_database: Callable[[], str], postgres_url: str) -> None:
    other = new_postgres_database()
    assert other != postgres_url
    engine = create_engine(other)
    try:
        with engine.begin() as conn:
            assert inspect(conn).get_table_names() == []
            conn.execute(text("CREATE TABLE scratch (x int)"))
    finally:
        engine.dispose()
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert "scratch" not in inspect(conn).get_table_names()
    finally:
        engine.dispose()
