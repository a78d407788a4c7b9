"""Settings: the only place that reads the environment (prefix ``VNA_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything VNA can be told from outside, with the embedded defaults."""

    model_config = SettingsConfigDict(env_prefix="VNA_", extra="ignore")

    data_dir: Path = Path("./data")
    ae_title: str = "VNA"
    dimse_port: int = 11112
    http_port: int = 8080
    hl7_port: int = 2575
    """HL7 v2 over MLLP (orders and ADT from the RIS); 0 turns the listener off."""
    bind: str = "127.0.0.1"
    peers: str = Field(
        default="",
        description="Known AEs for C-MOVE: 'AE@host:port,AE2@host:port'",
    )

    storage_url: str = ""
    """``file:///path`` (default: ``$DATA_DIR/blobs``) or ``s3://bucket?endpoint=...``."""
    index_url: str = ""
    """``sqlite:///path`` (default: ``$DATA_DIR/index.sqlite``) or ``postgresql://...``."""
    bus_url: str = "local://"
    """``local://`` (in-process) or ``amqp://user:pass@host:port/vhost``."""
    worklist_port: int = 11113
    """MWL/MPPS port of the separate worklist process under ``vna up``."""
    bus_namespace: str = "vna"
    """Exchange name and queue prefix on RabbitMQ: lets several archives share a broker."""
    redis_url: str = ""
    """Optional: ``redis://host:port/db``; in-process cache and locks when empty."""

    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_region: str = "us-east-1"

    metrics_port: int = 0
    """Where ``vna ingest`` and ``vna index`` serve Prometheus ``/metrics`` (they have no
    HTTP port of their own); 0: nowhere. ``vna up`` gives them the two below."""
    up_ingest_metrics_port: int = 9101
    up_index_metrics_port: int = 9102

    ingest_workers: int = 0
    """DIMSE receiver processes of ``vna run`` and ``vna ingest`` (the archive accepts
    and hands each association to the least busy); 1 receives in the main process;
    0 (default) means one per core plus one."""
    lean_storage: bool = True
    """Serve associations that only store (and echo) with VNA's lean Storage SCP;
    false leaves every association to pynetdicom."""
    http_workers: int = 0
    """HTTP processes of ``vna run`` and ``vna dicomweb``, sharing the HTTP port; 1
    serves in the main process; 0 (default) means one per core plus one."""
    max_pdu: int = 0
    """Maximum PDU length we accept; 0 means unlimited."""
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    commitment_retry_seconds: str = "10,60,300,1800"
    """After a Storage Commitment report could not be delivered on a new association
    (a requester in ``VNA_PEERS`` not listening, or not acknowledging it), wait this
    long before each further attempt: '10,60,300,1800' tries four more times, over
    about 36 minutes; '' never retries."""
    qido_max_results: int = 1000
    """QIDO-RS answers at most this many matches; more get a 299 Warning (PS3.18 8.3.4.4)."""
    viewer_dir: Path = Path("./viewer/dist")
    """Where ``make viewer`` installed the OHIF viewer served at ``/viewer``."""
    cors_origins: str = ""
    """Origins allowed to call the HTTP API from a browser: 'https://a,https://b' or '*'."""
    extra_query_attributes: str = ""
    """More attributes C-FIND and QIDO-RS match on: ``[level:]key[/VR],...`` with key a
    keyword, a tag or ``ggggxxee@PrivateCreator``; level ``series`` by default (see
    ``vna.dicom.extended``). Instances already stored are backfilled online."""
    log_level: str = "INFO"
    log_format: str = "json"

    # Conflict policies (design invariant 5): 'reject' is the only safe default.
    on_sop_conflict: str = "reject"
    on_patient_conflict: str = "reject"

    @field_validator("commitment_retry_seconds")
    @classmethod
    def _retry_delays_valid(cls, value: str) -> str:
        _delays(value)
        return value

    def commitment_retry_delays(self) -> list[float]:
        """``VNA_COMMITMENT_RETRY_SECONDS`` as seconds, one per retry."""
        return _delays(self.commitment_retry_seconds)

    def blob_url(self) -> str:
        return self.storage_url or (self.data_dir.resolve() / "blobs").as_uri()

    def db_url(self) -> str:
        if self.index_url:
            return self.index_url
        return f"sqlite:///{(self.data_dir.resolve() / 'index.sqlite')}"

    def peer_table(self) -> dict[str, tuple[str, int]]:
        """Parse ``VNA_PEERS`` into ``{AE: (host, port)}``."""
        table: dict[str, tuple[str, int]] = {}
        for item in filter(None, (p.strip() for p in self.peers.split(","))):
            ae, _, addr = item.partition("@")
            host, _, port = addr.rpartition(":")
            if not ae or not host or not port.isdigit():
                raise ValueError(f"VNA_PEERS entry {item!r} is not AE@host:port")
            table[ae.strip()] = (host, int(port))
        return table


def _delays(value: str) -> list[float]:
    """Comma-separated seconds, each 0 to a day; ValueError saying which is not."""
    delays: list[float] = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            seconds = float(item)
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds <= 86_400:
            raise ValueError(f"{item!r} is not a number of seconds (0 to 86400)")
        delays.append(seconds)
    return delays
