"""Start VNA as a user would (a process), and wait on conditions with deadlines."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], T], timeout: float = 60.0, interval: float = 0.1,
             what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling; report the last error
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}" + (f": {last}" if last else ""))


class VnaProcess:
    """``vna <command>`` as a child process with its own ports and data dir."""

    def __init__(self, data_dir: Path, command: str = "run", env: dict[str, str] | None = None,
                 dimse_port: int | None = None, http_port: int | None = None) -> None:
        self.data_dir = data_dir
        self.command = command
        self.dimse_port = dimse_port or free_port()
        self.http_port = http_port or free_port()
        self.env = {
            **os.environ,
            "VNA_DATA_DIR": str(data_dir),
            "VNA_DIMSE_PORT": str(self.dimse_port),
            "VNA_HTTP_PORT": str(self.http_port),
            "VNA_HL7_PORT": str(free_port()),
            "VNA_WORKLIST_PORT": str(free_port()),
            "VNA_LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}-{command}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 90.0) -> VnaProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "vna", self.command], env=self.env,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(self._ready, timeout, 0.2, f"vna {self.command} to be ready (log: {self.log})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"vna exited with {self.proc.returncode}: "
                                 + self.log.read_text()[-3000:])
        try:
            return httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200 and \
                _port_open(self.dimse_port)
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return int(self.proc.returncode)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def delete_bus_namespace(amqp_url: str, namespace: str) -> None:
    """Remove what a test's archive declared on the shared broker."""
    from vna.adapters.bus.rabbitmq import RabbitBus

    bus = RabbitBus(amqp_url, namespace=namespace)
    try:
        bus.delete_namespace(["vna.index", "vna.worklist"])
    finally:
        bus.stop()


def drop_postgres_database(name: str,
                           admin_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
                           ) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@contextmanager
def vna_up(data_dir: Path, backends: dict[str, str], timeout: float = 120.0,
           env: dict[str, str] | None = None) -> Iterator[VnaProcess]:
    """``vna up`` on the machine's backends (``backends`` fixture of tests/e2e), with a
    database and a bus namespace of its own, both removed afterwards; S3 is the
    ``rclone serve s3`` that ``vna up`` starts itself."""
    db = f"vna_e2e_{uuid.uuid4().hex[:8]}"
    env = {
        "VNA_INDEX_URL": f"{backends['postgresql'].rstrip('/')}/{db}",
        "VNA_BUS_URL": backends["amqp"],
        "VNA_BUS_NAMESPACE": f"vna-e2e-{uuid.uuid4().hex[:8]}",
        "VNA_REDIS_URL": backends["redis"],
        "VNA_STORAGE_URL": "",
        **(env or {}),
    }
    archive = VnaProcess(data_dir, command="up", env=env)
    try:
        archive.start(timeout=timeout)
        yield archive
    finally:
        if archive.proc is not None:
            archive.stop()
        drop_postgres_database(db)
        delete_bus_namespace(backends["amqp"], env["VNA_BUS_NAMESPACE"])
