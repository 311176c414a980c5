"""Real local services for tests: a moto S3 server and a fresh PostgreSQL schema. No skips: if a service is
unreachable, these raise and the test fails."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from moto.server import ThreadedMotoServer
from tests.support.ports import free_port

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
S3_REGION = "us-east-1"


@contextmanager
def moto_endpoint(region: str = S3_REGION) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with dummy credentials in boto3's standard chain (never real ones)."""
    mp = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": region,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        mp.setenv(name, value)
    mp.delenv("AWS_SESSION_TOKEN", raising=False)
    mp.delenv("AWS_PROFILE", raising=False)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


@contextmanager
def postgres_schema_url(prefix: str) -> Iterator[str]:
    """A SQLAlchemy URL whose search_path is a fresh schema, dropped afterwards."""
    schema = prefix + uuid.uuid4().hex[:12]
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/test?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@contextmanager
def database_url(backend: str, sqlite_file: Path, pg_prefix: str) -> Iterator[str]:
    """``"sqlite"``: a URL for ``sqlite_file``; ``"postgres"``: a fresh schema (``postgres_schema_url``)."""
    if backend == "sqlite":
        yield f"sqlite:///{sqlite_file}"
        return
    # No skip: an unreachable server makes this (and so the test) fail.
    with postgres_schema_url(pg_prefix) as url:
        yield url
