"""Structured logs keep their own fields whatever a caller passes as extras."""

from __future__ import annotations

import json
import logging

from vna.logging import JsonFormatter


def test_extras_never_overwrite_the_record_fields() -> None:
    record = logging.LogRecord("vna.qr", logging.INFO, __file__, 1, "C-FIND", None, None)
    record.__dict__.update({"level": "STUDY", "msg_count": 3, "matches": 2})
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "info"
    assert line["extra_level"] == "STUDY"
    assert (line["logger"], line["msg"], line["matches"]) == ("vna.qr", "C-FIND", 2)
