"""WADO-RS transcoding benchmark: a study stored compressed, retrieved as stored and as
Explicit VR Little Endian; single frames decoded. Figures, not assertions.

    .venv/bin/python -m bench.transcode [--count 40] [--size 512]

The archive runs in this process (embedded adapters, uvicorn on loopback) and the
client reads the response as a stream. For each stored syntax it prints: the study
as stored (the reference: no decoding), the study as Explicit VR Little Endian
(time to first byte, total, instances/s), pydicom decoding the same instances
in-process with no HTTP (the floor for the transcoded figure), and one frame as
application/octet-stream. The peak memory allocated (tracemalloc, numpy included)
while the server transcodes a study is printed for two study sizes: with one
instance transcoded at a time it should not grow with the number of instances.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pydicom
import uvicorn
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from services.dicomweb.app import create_app
from tests.support.compressed import compressed_ct, part10
from tests.support.processes import free_port, wait_for
from vna.bootstrap import build
from vna.cli import subscribe_indexer
from vna.config import Settings
from vna.usecases.relay import OutboxRelay

EXPLICIT = "1.2.840.10008.1.2.1"


CLIENT = httpx.Client(timeout=600)


def _get(url: str, accept: str) -> tuple[float, float, int]:
    """(seconds to first byte, seconds in all, bytes) of a streamed GET."""
    started = time.perf_counter()
    first = 0.0
    size = 0
    with CLIENT.stream("GET", url, headers={"Accept": accept}) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            if not first:
                first = time.perf_counter() - started
            size += len(chunk)
    return first, time.perf_counter() - started, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="instances per study")
    parser.add_argument("--size", type=int, default=512, help="rows and columns")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deps = build(Settings(data_dir=Path(tmp), storage_url="", index_url="",
                              bus_url="local://", redis_url="", log_format="text",
                              log_level="WARNING"))
        subscribe_indexer(deps)
        deps.bus.start()
        relay = OutboxRelay(index=deps.index, bus=deps.bus)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(deps), host="127.0.0.1", port=port,
                                               log_config=None, access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, 30, 0.02, "uvicorn to start")
        root = f"http://127.0.0.1:{port}/dicomweb"
        print(f"{args.count} instances of {args.size}x{args.size} 12-bit CT per study, "
              f"one client, loopback")
        print(f"{'stored as':<28} {'as stored':>12} {'explicit LE':>12} {'TTFB':>8} "
              f"{'inst/s':>8} {'pydicom':>9} {'frame':>8} {'(stored)':>10}")
        try:
            for ts in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
                study = generate_uid()
                raws = [part10(compressed_ct(ts, rows=args.size, columns=args.size,
                                             study_uid=study, instance_number=n + 1))
                        for n in range(args.count)]
                boundary = "bench"
                body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n"
                                .encode() + raw + b"\r\n" for raw in raws)
                body += f"--{boundary}--\r\n".encode()
                r = CLIENT.post(f"{root}/studies", content=body, headers={
                    "Content-Type": f'multipart/related; type="application/dicom"; '
                                    f"boundary={boundary}"})
                r.raise_for_status()
                while relay.drain_once():
                    pass
                url = f"{root}/studies/{study}"
                _, stored_s, _ = _get(url, 'multipart/related; type="application/dicom"; '
                                           "transfer-syntax=*")
                ttfb, le_s, size = _get(url, 'multipart/related; type="application/dicom"; '
                                             f"transfer-syntax={EXPLICIT}")
                started = time.perf_counter()
                for raw in raws:
                    pydicom.dcmread(io.BytesIO(raw)).pixel_array  # noqa: B018
                floor = time.perf_counter() - started
                one = deps.index.instances(study_instance_uid=study)[0]
                frame_url = (f"{url}/series/{one.ref.series_instance_uid}/instances/"
                             f"{one.ref.sop_instance_uid}/frames/1")
                frame_stored = min(_get(frame_url, 'multipart/related; type="application/'
                                              'octet-stream"; transfer-syntax=*')[1]
                                   for _ in range(5))
                frame_s = min(_get(frame_url, 'multipart/related; '
                                              'type="application/octet-stream"')[1]
                              for _ in range(5))
                print(f"{ts.name[:28]:<28} {stored_s * 1000:>10.0f}ms {le_s * 1000:>10.0f}ms "
                      f"{ttfb * 1000:>6.0f}ms {args.count / le_s:>8.1f} "
                      f"{floor * 1000:>7.0f}ms {frame_s * 1000:>6.1f}ms "
                      f"{frame_stored * 1000:>8.1f}ms  ({size >> 20} MiB sent)")
            for count in (max(2, args.count // 4), args.count):
                study = generate_uid()
                raws = [part10(compressed_ct(JPEG2000Lossless, rows=args.size,
                                             columns=args.size, study_uid=study,
                                             instance_number=n + 1)) for n in range(count)]
                body = b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + raw
                                + b"\r\n" for raw in raws) + b"--b--\r\n"
                CLIENT.post(f"{root}/studies", content=body, headers={
                    "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'}
                           ).raise_for_status()
                del raws, body
                while relay.drain_once():
                    pass
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
                _get(f"{root}/studies/{study}", 'multipart/related; type="application/dicom"; '
                                                f"transfer-syntax={EXPLICIT}")
                peak = tracemalloc.get_traced_memory()[1] - base
                tracemalloc.stop()
                print(f"peak memory allocated transcoding a study of {count:>3} instances "
                      f"(JPEG 2000 -> explicit LE, {count * args.size ** 2 * 2 >> 20} MiB of "
                      f"pixels): {peak / (1 << 20):6.1f} MiB")
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            deps.close()


if __name__ == "__main__":
    main()
