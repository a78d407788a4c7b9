"""The audit trail's hash chain (design invariant 8): one formula for every writer."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime


def chain_hash(prev_hash: str, at: datetime, action: str, outcome: str, actor: str,
               subject: str, detail: str) -> str:
    """SHA-256 over the previous hash and this record: editing any record breaks the chain."""
    body = json.dumps([prev_hash, at.isoformat(), action, outcome, actor, subject, detail])
    return hashlib.sha256(body.encode()).hexdigest()
