"""The Celery application shared by API nodes (which only send) and workers (which consume).

A message carries nothing but a task id; the store holds the task. Durability comes from both sides:
the broker keeps a message until the worker acknowledges it *after* the task ran (``acks_late``), a worker
reserves one message at a time (prefetch 1), and the store's lease decides who may finish a task, so a message
delivered twice is harmless (the second claim finds the task running or done and does nothing).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from underpaint.config import Settings

TASK_NAME = "underpaint.process_task"
_SCHEMES = ("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")


def check_broker_url(url: str) -> str:
    if not url.startswith(_SCHEMES):
        raise ValueError(
            f"unsupported broker URL {url.split(':', 1)[0]!r}: use redis://host:6379/0 or amqp://user:pass@host:5672//"
        )
    return url


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": check_broker_url(settings.broker_url),
        "broker_connection_retry_on_startup": True,
        # Redis: how long an unacknowledged message stays reserved before it is given to another worker.
        "broker_transport_options": {"visibility_timeout": settings.broker_visibility_timeout},
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,  # results live in the task store
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_delivery_mode": "persistent",
        "task_create_missing_queues": True,
        # Our logging setup (text or JSON) stays in charge.
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_send_task_events": False,
        "worker_disable_rate_limits": True,
        # RabbitMQ: a solo-pool worker cannot answer AMQP heartbeats while a generation runs, and the broker would
        # drop its connection mid-task; a dead peer is found by TCP keepalive instead.
        "broker_heartbeat": 0,
    }


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("underpaint", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app
