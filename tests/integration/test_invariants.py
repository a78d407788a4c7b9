"""Design invariant 1 over real backends: acknowledged means durable.

- With RabbitMQ away, C-STORE still succeeds: the events wait in the outbox
  (in PostgreSQL) and every instance is indexed once the broker is back.
- With the blob store away, the sender gets 0xA700 and nothing is recorded.

The outages are made with a TCP fault proxy in front of the real services,
so the machine's broker and S3 server keep running for everyone else.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.support.processes import delete_bus_namespace, free_port, wait_for
from vna.bootstrap import Deps, build
from vna.cli import subscribe_indexer
from vna.config import Settings
from vna.dicom import status
from vna.testing.faultproxy import FaultProxy
from vna.testing.synthetic import ct_instance, write_ct_series
from vna.usecases.relay import OutboxRelay

pytestmark = pytest.mark.integration


class Ingest:
    """The ingest and index services in-process, each with deps of its own."""

    def __init__(self, settings: Settings) -> None:
        from services.ingest.scp import start_dimse

        self.ingest = build(settings)
        # An in-process bus only reaches handlers in the same process.
        self.indexer: Deps = build(settings) if settings.bus_url != "local://" else self.ingest
        subscribe_indexer(self.indexer)
        self.ingest.bus.start()
        self.relay = OutboxRelay(index=self.ingest.index, bus=self.ingest.bus, max_backoff=1.0)
        self.relay.start()
        self.server = start_dimse(self.ingest, on_stored=self.relay.wake)
        self.indexer.bus.start()

    def close(self) -> None:
        self.server.shutdown()
        self.relay.stop()
        self.ingest.close()
        if self.indexer is not self.ingest:
            self.indexer.close()


def _settings(tmp: Path, **values: Any) -> Settings:
    return Settings(data_dir=tmp, dimse_port=free_port(), http_port=free_port(),
                    **values)


@pytest.fixture
def rabbit_proxy(amqp_url: str) -> Iterator[FaultProxy]:
    parsed = urlparse(amqp_url)
    with FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672) as proxy:
        yield proxy


def test_broker_outage_does_not_stop_ingest(
    tmp_path: Path, fresh_postgres_url: str, amqp_url: str, bus_namespace: str,
    rabbit_proxy: FaultProxy,
) -> None:
    storescu = shutil.which("storescu")
    assert storescu, "dcmtk is missing: apt-get install -y dcmtk"
    parsed = urlparse(amqp_url)
    through_proxy = amqp_url.replace(f"{parsed.hostname}:{parsed.port or 5672}",
                                     f"127.0.0.1:{rabbit_proxy.port}")
    settings = _settings(tmp_path / "data", index_url=fresh_postgres_url,
                         bus_url=through_proxy, bus_namespace=bus_namespace)
    services = Ingest(settings)
    try:
        wait_for(lambda: services.indexer.bus.check() is None, 30, what="indexer connected")
        files = write_ct_series(tmp_path / "study", 200, patient_id="OUTAGE")

        rabbit_proxy.cut()
        done = subprocess.run([storescu, "-aec", "VNA", "127.0.0.1", str(settings.dimse_port),
                               "+sd", str(files[0].parent)], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        counts = services.ingest.index.counts()
        assert counts["claims"] == 200
        assert counts["instances"] == 0
        assert services.ingest.index.outbox_depth() == 200

        rabbit_proxy.restore()
        wait_for(lambda: services.ingest.index.counts()["instances"] == 200, 180, 0.2,
                 "all 200 indexed after the broker came back")
        wait_for(lambda: services.ingest.index.outbox_depth() == 0, 60, 0.2, "outbox drained")
        assert services.ingest.index.counts()["instances"] == 200
    finally:
        services.close()
        delete_bus_namespace(amqp_url, bus_namespace)


def test_blob_store_outage_answers_out_of_resources(
    tmp_path: Path, fresh_postgres_url: str, s3_server: Any, s3_bucket: str,
) -> None:
    endpoint = urlparse(s3_server.url)
    with FaultProxy(endpoint.hostname or "127.0.0.1", endpoint.port or 80) as proxy:
        settings = _settings(
            tmp_path / "data", index_url=fresh_postgres_url,
            storage_url=f"s3://{s3_bucket}?endpoint=http://127.0.0.1:{proxy.port}",
            s3_access_key=s3_server.access_key, s3_secret_key=s3_server.secret_key)
        services = Ingest(settings)
        try:
            ds = ct_instance()
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", settings.dimse_port, ae_title="VNA")
            assert assoc.is_established
            proxy.cut()
            rsp = assoc.send_c_store(ds)
            assert rsp.Status == status.OUT_OF_RESOURCES
            assert "retry" in str(rsp.ErrorComment)
            assert services.ingest.index.counts()["claims"] == 0
            assert services.ingest.index.outbox_depth() == 0
            proxy.restore()
            rsp = assoc.send_c_store(ds)  # the sender retries: now it is stored
            assert rsp.Status == status.SUCCESS
            assoc.release()
            wait_for(lambda: services.ingest.index.counts()["instances"] == 1, 60,
                     what="indexed after retry")
        finally:
            services.close()
