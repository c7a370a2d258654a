"""The scripts under scripts/ from redis-py against a real Redis.

Usage: python3 tests/python/test_scripts.py <redis port>
Run by tests/race.rs (scripts_work_from_python_redis_py). No pytest needed;
exits non-zero on the first failure. Needs redis-py (`pip install redis`).
"""

import os
import sys

try:
    import redis
except ImportError:
    sys.exit("redis-py is missing: pip install redis")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
PREFIX = b"\x00cache-invalidator:tombstone:"


def script(name):
    with open(os.path.join(ROOT, "scripts", name), encoding="utf-8") as f:
        return f.read()


def marker(lsn):
    return PREFIX + b"%016X" % lsn


def main():
    r = redis.Redis(port=int(sys.argv[1]))
    r.flushall()
    tombstone_set = r.register_script(script("tombstone_set.lua"))
    tag_tombstone = r.register_script(script("tag_tombstone.lua"))
    guarded_fill = r.register_script(script("guarded_fill.lua"))
    versioned_get = r.register_script(script("versioned_get.lua"))

    # TOMBSTONE_SET: replaces values, orders by LSN, sets PX.
    r.set("k", "cached")
    assert tombstone_set(keys=["k"], args=[5000, "%016X" % 0x20]) == 1
    assert r.get("k") == marker(0x20)
    assert 0 < r.pttl("k") <= 5000
    assert tombstone_set(keys=["k"], args=[5000, "%016X" % 0x1F]) == 0
    assert r.get("k") == marker(0x20)
    assert tombstone_set(keys=["k", "h"], args=[5000, "%016X" % (1 << 32), "%016X" % 1]) == 2
    assert r.get("k") == marker(1 << 32)

    # TAG_TOMBSTONE: every member, in SSCAN steps, members kept.
    for i in range(1500):
        r.set("m:%d" % i, "x")
        r.sadd("tag:t", "m:%d" % i)
    cursor, seen = "0", 0
    while True:
        cursor, n = tag_tombstone(keys=["tag:t"], args=[cursor, 1000, "%016X" % 7, 5000])
        seen += n
        if cursor in (b"0", "0"):
            break
    assert seen >= 1500
    assert all(r.get("m:%d" % i) == marker(7) for i in range(1500))
    assert r.scard("tag:t") == 1500

    # GUARDED_FILL: absent -> SET NX; a remembered tombstone must still be there.
    assert guarded_fill(keys=["f", "tag:user:1"], args=["", "v1", 300, 360]) == 1
    assert r.get("f") == b"v1" and r.sismember("tag:user:1", "f")
    assert r.ttl("tag:user:1") > 300
    assert guarded_fill(keys=["f"], args=["", "v2", 300]) == 0
    r.set("f", marker(1))
    seen_at_miss = r.get("f")
    r.set("f", marker(2))  # a commit landed meanwhile
    assert guarded_fill(keys=["f"], args=[seen_at_miss, "stale", 300]) == 0
    assert r.get("f") == marker(2)
    assert guarded_fill(keys=["f"], args=[marker(2), "fresh", 300]) == 1
    assert r.get("f") == b"fresh"

    # VERSIONED_GET: version and data in one round trip.
    assert versioned_get(keys=["version:user:1"], args=["user:1", "profile", 1]) == [1, None]
    r.set("user:1:v1:profile", "p1")
    assert versioned_get(keys=["version:user:1"], args=["user:1", "profile", 1]) == [1, b"p1"]
    r.set("version:user:1", 2)
    assert versioned_get(keys=["version:user:1"], args=["user:1", "profile", 1]) == [2, None]
    print("ok")


if __name__ == "__main__":
    main()
