"""A RabbitMQ broker restart without persistence, for real: a private RabbitMQ node started by the test
(``tests/support/faults.py``: its own node name, ports and data folder under tmp, no management plugin) is
SIGKILLed with messages in it, its data folder wiped, and started again, while an API node and a Celery worker
(``tests/support/fault_cluster.py``) run on it. Every accepted task SUCCEED (the lost ones claimed from the store),
and the worker reconnects and consumes messages again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.scale.conftest import PG_ADMIN, PG_BASE
from tests.support.fault_cluster import Faulty, broker_restart_loses_no_task, faulty_cluster
from tests.support.faults import RabbitServer

pytestmark = [pytest.mark.services, pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    node = RabbitServer(tmp_path_factory.mktemp("rabbit"))
    node.spawn()  # it boots while the API node and the worker start
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, rabbit: RabbitServer) -> Iterator[Faulty]:
    with faulty_cluster(tmp_path_factory.mktemp("faults-rabbitmq"), tiny_models_dir, rabbit, PG_ADMIN, PG_BASE) as run:
        rabbit.wait_ready()
        yield run


def test_a_rabbitmq_restart_with_its_data_wiped_loses_no_task(faulty: Faulty, rabbit: RabbitServer) -> None:
    broker_restart_loses_no_task(faulty, wipe=rabbit.wipe)
