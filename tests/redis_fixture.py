"""A private ``redis-server`` for the tests that need one (the Redis event store, the Ray Serve cluster):
``from redis_fixture import redis_url`` makes the module-scoped fixture available to a test module."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A private redis-server on a free loopback port, in a tmp dir, without persistence."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the Redis event store needs the redis package (pip install redis)")
    d = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = d / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                                 "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"redis-server exited: {log.read_text()}"
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, f"redis-server not answering after 20 s: {log.read_text()}"
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
