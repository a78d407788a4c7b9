"""The Cache contract, over every adapter: memory and Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.processes import wait_for
from vna.adapters.cache.memory import MemoryCache
from vna.ports import Cache, Unavailable


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def clients(request: pytest.FixtureRequest) -> Iterator[tuple[Cache, Cache]]:
    """Two clients of one cache: two processes' view for Redis, one shared for memory."""
    if request.param == "memory":
        cache = MemoryCache()
        yield cache, cache
        return
    from vna.adapters.cache.redis import RedisCache

    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    a, b = RedisCache(url, prefix=prefix), RedisCache(url, prefix=prefix)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def cache(clients: tuple[Cache, Cache]) -> Cache:
    return clients[0]


def test_get_set_delete(cache: Cache) -> None:
    assert cache.get("k") is None
    cache.set("k", b"\x00value\xff")
    assert cache.get("k") == b"\x00value\xff"
    cache.set("k", b"other")
    assert cache.get("k") == b"other"
    cache.delete("k")
    assert cache.get("k") is None
    cache.delete("never-set")  # no error


def test_clients_see_each_others_writes(clients: tuple[Cache, Cache]) -> None:
    a, b = clients
    a.set("shared", b"from a")
    assert b.get("shared") == b"from a"
    b.delete("shared")
    assert a.get("shared") is None


def test_ttl_expiry(cache: Cache) -> None:
    cache.set("short", b"soon gone", ttl=0.3)
    cache.set("forever", b"stays")
    began = time.monotonic()
    assert cache.get("short") == b"soon gone"
    wait_for(lambda: cache.get("short") is None, 10, 0.02, "the short-lived key to expire")
    assert time.monotonic() - began >= 0.25  # it lived for its TTL, not less
    assert cache.get("forever") == b"stays"


def test_tiny_ttl_still_sets_and_expires(cache: Cache) -> None:
    cache.set("tiny", b"x", ttl=0.0001)
    wait_for(lambda: cache.get("tiny") is None, 10, 0.02, "the tiny-TTL key to expire")


def test_lock_excludes_the_other_client(clients: tuple[Cache, Cache]) -> None:
    a, b = clients
    held = a.lock("job", timeout=10)
    with held:
        contender = b.lock("job", timeout=10)
        assert contender.acquire(blocking=False) is False
    contender = b.lock("job", timeout=10)
    assert contender.acquire(blocking=False) is True
    contender.release()


def test_locks_serialise_a_read_modify_write(clients: tuple[Cache, Cache]) -> None:
    """Four threads over two clients increment a cached counter; none is lost."""
    a, b = clients
    a.set("counter", b"0")
    errors: list[BaseException] = []

    def work(client: Cache) -> None:
        try:
            for _ in range(15):
                with client.lock("counter", timeout=10):
                    value = int(client.get("counter") or b"-1000")
                    time.sleep(0.001)  # widens the race window an absent lock would lose
                    client.set("counter", str(value + 1).encode())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert a.get("counter") == b"60"


def test_different_lock_names_do_not_exclude(clients: tuple[Cache, Cache]) -> None:
    a, b = clients
    with a.lock("one", timeout=10):
        other = b.lock("two", timeout=10)
        assert other.acquire(blocking=False) is True
        other.release()


def test_check(cache: Cache) -> None:
    cache.check()


# ---------------------------------------------------------------- Redis only
@pytest.mark.integration
def test_redis_lock_lease_frees_a_dead_holder(redis_url: str, redis_prefix: str) -> None:
    from vna.adapters.cache.redis import RedisCache

    a, b = RedisCache(redis_url, prefix=redis_prefix), RedisCache(redis_url, prefix=redis_prefix)
    abandoned: Any = a.lock("lease", timeout=0.3)
    assert abandoned.acquire(blocking=False)  # and never released: the holder "died"
    wait_for(lambda: b.lock("lease", timeout=5).acquire(blocking=False), 10, 0.02,
             "the lease to expire")


@pytest.mark.integration
def test_redis_unreachable() -> None:
    from vna.adapters.cache.redis import RedisCache
    from vna.testing.s3server import free_port

    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=1)
    with pytest.raises(Unavailable):
        cache.check()
    assert cache.get("anything") is None  # away means a miss, not an error
    cache.set("anything", b"x")
