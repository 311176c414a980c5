"""What an API node asks the broker and the store: are they reachable, how deep is each queue.

Queue depth is a passive queue declare, which works on both brokers: RabbitMQ answers with the message count,
kombu's Redis transport with the length of the queue's lists. A queue that does not exist yet has depth 0.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from sqlalchemy import Engine, text

from underpaint.scale.celery_app import create_celery_app
from underpaint.scale.celery_queue import CeleryQueue
from underpaint.services import Services
from underpaint.storage.base import reachability
from underpaint.tasks.lanes import known_queues

log = logging.getLogger("underpaint.scale")

PROBE_TIMEOUT = 2.0


def celery_app_of(services: Services) -> Celery:
    queue = services.queue
    return queue.app if isinstance(queue, CeleryQueue) else create_celery_app(services.settings)


class BrokerProbe:
    def __init__(self, services: Services, engine: Engine, app: Celery | None = None) -> None:
        self.services = services
        self.engine = engine
        self.app = app if app is not None else celery_app_of(services)

    def queues(self) -> list[str]:
        return known_queues(self.services.settings, self.services.registry.list("checkpoint"))

    def queue_depths(self) -> dict[str, int]:
        depths: dict[str, int] = {}
        with self.app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT)
            for queue in self.queues():
                # A fresh channel per queue: RabbitMQ closes the channel on a passive declare of a missing queue.
                with conn.channel() as channel:
                    try:
                        depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
                    except conn.channel_errors:
                        depths[queue] = 0
        return depths

    def broker_ok(self) -> bool:
        try:
            with self.app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT)
            return True
        except Exception as exc:
            log.warning("broker unreachable: %r", exc)
            return False

    def store_ok(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception as exc:
            log.warning("task store unreachable: %r", exc)
            return False

    def health(self) -> dict[str, Any]:
        """For ``/health``: each value is ``"ok"`` or why not (the store down makes it 503; the broker or the image
        storage down only "degraded")."""
        return {
            "store": "ok" if self.store_ok() else "unreachable",
            "broker": "ok" if self.broker_ok() else "unreachable",
            "storage": reachability(self.services.storage),
        }
