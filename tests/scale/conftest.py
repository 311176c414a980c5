"""Real services for the scale-out tests: PostgreSQL, Redis, RabbitMQ and an S3-protocol server on loopback.

Each fixture *fails* (never skips) when its service is missing. Every session gets its own PostgreSQL database
and its own Redis database number, both removed afterwards, so concurrent sessions do not see each other.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from tests.support.fault_cluster import Faulty, faulty_cluster
from tests.support.faults import RedisServer
from tests.support.ports import free_port

PG_ADMIN = os.environ.get("UNDERPAINT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BASE = os.environ.get("UNDERPAINT_TEST_PG_BASE", "postgresql+psycopg://postgres@127.0.0.1:5432")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
RABBIT_URL = os.environ.get("UNDERPAINT_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _fail(service: str, exc: BaseException) -> None:
    pytest.fail(f"{service} is required for the scale-out tests and is not reachable: {exc!r}", pytrace=False)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    name = f"underpaint_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        _fail("PostgreSQL (127.0.0.1:5432, user postgres)", exc)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_BASE}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis database number no one else is using (claimed with a marker key), flushed afterwards."""
    marker = f"underpaint-test-{uuid.uuid4().hex}"
    for db in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=5)
        try:
            if client.dbsize() == 0 and client.set("underpaint:test-owner", marker, nx=True, ex=3 * 3600):
                break
        except redis.RedisError as exc:
            _fail(f"Redis ({REDIS_HOST}:{REDIS_PORT})", exc)
    else:
        pytest.fail("no free Redis database number (1-15) for this test session", pytrace=False)
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    finally:
        client.flushdb()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    from kombu.connection import Connection

    try:
        with Connection(RABBIT_URL, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        _fail("RabbitMQ (127.0.0.1:5672, guest/guest)", exc)
    return RABBIT_URL


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """An S3-protocol server (moto) on loopback with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    import boto3

    name = f"underpaint-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Faulty]:
    """An API node and a worker whose faults the test owns (``tests/support/fault_cluster.py``), on a Redis server
    of their own; one per test file."""
    root = tmp_path_factory.mktemp("faults")
    broker = RedisServer(root / "redis")
    broker.start()
    try:
        with faulty_cluster(root, tiny_models_dir, broker, PG_ADMIN, PG_BASE) as run:
            yield run
    finally:
        broker.kill()
