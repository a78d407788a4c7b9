from __future__ import annotations

import os
import socket

import pytest


def _reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


HOW_TO_START = {
    "postgresql": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "rabbitmq": "rabbitmq-server -detached",
    "redis": "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ''",
}


@pytest.fixture(scope="session")
def backends() -> dict[str, str]:
    """The machine's PostgreSQL, RabbitMQ and Redis; fail (or skip, if allowed) when away."""
    missing = [name for name, port in (("postgresql", 5432), ("rabbitmq", 5672),
                                       ("redis", 6379)) if not _reachable("127.0.0.1", port)]
    if missing:
        message = "; ".join(f"{m} is not running on 127.0.0.1 (start it: {HOW_TO_START[m]})"
                            for m in missing)
        if os.environ.get("VNA_TEST_ALLOW_SKIP") == "1":
            pytest.skip(message)
        pytest.fail(message)
    return {
        "postgresql": "postgresql://postgres@127.0.0.1:5432/",
        "amqp": "amqp://guest:guest@127.0.0.1:5672/",
        "redis": "redis://127.0.0.1:6379/0",
    }
