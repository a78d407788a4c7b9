"""Events on the wire, and the local bus's topic matching."""

from __future__ import annotations

import pytest

from vna.adapters.bus.local import topic_matches
from vna.events import InstanceStored, decode_event, encode_event
from vna.model import BlobKey


def _stored(size: int) -> InstanceStored:
    return InstanceStored(sop_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                          study_instance_uid="1.2.3", series_instance_uid="1.2.3.1",
                          transfer_syntax_uid="1.2.840.10008.1.2.1",
                          blob_key=BlobKey("ab" * 32), size=size, source_ae="CT1")


@pytest.mark.parametrize("size", [524_288, 2**70], ids=["64-bit", "beyond-64-bits"])
def test_an_event_decodes_to_what_was_encoded(size: int) -> None:
    # orjson parses events; an integer beyond 64 bits, which it refuses, still decodes.
    event = _stored(size)
    assert decode_event(encode_event(event)) == event


def test_decode_refuses_what_is_not_an_event() -> None:
    with pytest.raises(ValueError):
        decode_event(b"{not json")
    with pytest.raises(ValueError, match="not a known VNA event"):
        decode_event(b'{"type": "instance.melted"}')
    with pytest.raises(ValueError, match="not a known VNA event"):
        decode_event(b"[1, 2]")


@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("instance.stored", "instance.stored", True),
    ("instance.stored", "instance.indexed", False),
    ("instance.*", "instance.stored", True),
    ("instance.*", "instance.stored.again", False),
    ("instance.#", "instance", True),
    ("instance.#", "instance.stored.again", True),
    ("#.stored", "instance.stored", True),
    ("#", "anything.at.all", True),
    ("*.stored", "stored", False),
    ("instance.stored", "instanceXstored", False),  # the dot is literal
])
def test_topic_matching_follows_amqp(pattern: str, key: str, matches: bool) -> None:
    # Twice: the second answer comes from the compiled pattern kept for it.
    assert topic_matches(pattern, key) is matches
    assert topic_matches(pattern, key) is matches
