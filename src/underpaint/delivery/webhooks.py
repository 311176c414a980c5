"""Webhook delivery: a durable outbox in the task database, drained by a background sender.

``enqueue`` only inserts a row and wakes the sender, so a slow or dead receiver never stalls generation. The
sender claims due rows with a short lease (several processes may run a dispatcher on one database; a claimed row
is sent by one of them), POSTs ``{"event_type": "ASYNC_TASK_RESULT", "payload": <task-result body>}`` with
Standard Webhooks signature headers, and retries on timeout, connection errors or non-2xx with exponential
backoff. Rows stay ``pending`` until delivered or out of retries, so a restart resumes them. At most
``per_target`` attempts run at once per receiver, so one hanging receiver cannot delay everyone else's webhooks.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import Engine, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from underpaint.config import Settings
from underpaint.db.engine import open_engine
from underpaint.db.migrations import migrate
from underpaint.db.schema import deliveries_table
from underpaint.delivery import ssrf
from underpaint.delivery.sample_event import FAILED_REASON, sample_png
from underpaint.delivery.signing import signature_headers
from underpaint.storage.base import ImageStorage
from underpaint.storage.urls import ImageUrls
from underpaint.tasks.contract import TaskExtra
from underpaint.tasks.lifecycle import TerminalHook
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus, TaskStore
from underpaint.wire.result import task_result_body

log = logging.getLogger(__name__)

EVENT_TYPE = "ASYNC_TASK_RESULT"
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
USER_AGENT = "Underpaint-Webhooks/1"
# Due rows looked at per pass; rows of receivers at their concurrency limit are skipped within this window.
_SCAN_WINDOW = 256

_d = deliveries_table


@dataclass(frozen=True)
class Delivery:
    id: str
    task_id: str
    event: str
    owner: str
    url: str
    body: dict[str, Any]
    attempts: int
    next_attempt_at: float
    status: str
    last_error: str
    created_at: float
    updated_at: float


def _target(url: str) -> str:
    """The receiver a URL points at, for the per-receiver concurrency limit."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return url
    return f"{parsed.host}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"


def _unleased(now: float) -> ColumnElement[bool]:
    return or_(_d.c.lease_until.is_(None), _d.c.lease_until < now)


def _dumps(event_type: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"event_type": event_type, "payload": body}, separators=(",", ":"), ensure_ascii=False).encode()


class WebhookDispatcher:
    """Durable webhook outbox plus its sender. ``start()`` resumes every pending delivery; ``stop()`` ends it.

    ``secret_for(owner)`` gives the ``whsec_`` signing secret of a task owner (``signing.make_secret_for``).
    ``storage`` and ``store`` are needed only by ``submit_test_event``.
    """

    def __init__(
        self,
        engine_or_url: Engine | str,
        settings: Settings,
        secret_for: Callable[[str], str],
        *,
        storage: ImageStorage | None = None,
        store: TaskStore | None = None,
        backoff_base: float = 1.0,
        workers: int = 8,
        per_target: int = 2,
        poll_interval: float = 1.0,
        lease_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._owns_engine = isinstance(engine_or_url, str)
        if isinstance(engine_or_url, str):
            self.engine = open_engine(engine_or_url)
            migrate(self.engine)  # the outbox table is part of the one schema
        else:
            self.engine = engine_or_url  # opened and migrated by its owner (the task store)
        self.settings = settings
        self.secret_for = secret_for
        self.storage = storage
        self.store = store
        self.backoff_base = backoff_base
        self.workers = max(1, workers)
        # At most this many attempts in flight per receiver (host:port), so that one hanging receiver cannot
        # occupy every sender and delay everyone else's webhooks.
        self.per_target = max(1, per_target)
        self.poll_interval = poll_interval
        # An attempt outlives the POST timeout by a margin; a row whose sender died is retried after this.
        self.lease_seconds = lease_seconds if lease_seconds is not None else settings.webhook_timeout + 30.0
        self.clock = clock
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._client: httpx.Client | None = None
        self._inflight: dict[str, str] = {}  # delivery id -> target (host:port)
        self._lock = threading.Lock()

    # --- submit side (API, workers) -------------------------------------------------------------------------

    def validate_url(self, url: str) -> None:
        """Raise ``ssrf.InvalidWebhookUrl`` for a webhook URL the SSRF policy refuses."""
        ssrf.check_url(url, self.settings.webhook_allow_hosts)

    def enqueue(self, task_id: str, owner: str, url: str, body: dict[str, Any], event: str = EVENT_TYPE) -> None:
        """Store one delivery of ``body`` (a task-result body) to ``url``; a repeat for the same task is ignored."""
        payload = json.loads(json.dumps(body))  # a private copy; fails here, not in the sender, if not JSON
        extra = payload.setdefault("extra", {})
        if isinstance(extra, dict) and not extra.get("webhook"):
            extra["webhook"] = {"url": url}  # Novita's payload echoes the webhook config
        now = self.clock()
        row = {
            "id": f"msg_{uuid.uuid4().hex}",
            "task_id": task_id,
            "event": event,
            "owner": owner,
            "url": url,
            "body": payload,
            "attempts": 0,
            "next_attempt_at": now,
            "lease_until": None,
            "status": PENDING,
            "last_error": "",
            "created_at": now,
            "updated_at": now,
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(_d), row)  # parameters apart: the compiled INSERT is cached
        except IntegrityError:
            log.info("webhook for task %s (%s) already queued; ignoring the repeat", task_id, event)
            return
        with self._lock:
            idle = len(self._inflight) < self.workers
        if idle:  # with every sender busy, the next one to finish wakes the loop anyway
            self._wake.set()

    def submit_test_event(self, task_id: str, owner: str, status: TaskStatus | str, extra: TaskExtra) -> None:
        """Test mode: end the (already created) task as ``status`` without generating, and send its result event.

        SUCCEED gets one real, downloadable sample PNG in the image storage; FAILED gets ``FAILED_REASON``. The
        payload is built from the stored task by the task-result serializer, so polling shows the same body.
        """
        status = TaskStatus(status)
        if not status.terminal:
            raise ValueError(f"test mode status must be SUCCEED or FAILED, not {status.value}")
        if extra.webhook is None:
            raise ValueError("test mode needs extra.webhook.url")
        url, base_url = extra.webhook.url, extra.base_url
        if self.store is None or self.storage is None:
            raise RuntimeError("WebhookDispatcher needs the task store and image storage for test mode")
        storage, ttl = self.storage, self.settings.image_url_ttl
        if status is TaskStatus.SUCCEED:
            image = ImageRecord(key=f"test_data/{task_id}.png", image_type="png", backend=storage.name)
            storage.put(image.key, sample_png(), "image/png")
            self.store.complete_unleased(task_id, [image])
        else:
            self.store.fail(task_id, None, FAILED_REASON)
        record = self.store.get(task_id)
        if record is None:
            raise LookupError(f"test mode: task {task_id!r} does not exist")
        body = task_result_body(record, lambda image: storage.url(image.key, ttl, base_url), ttl)
        body["extra"]["webhook"] = extra.webhook.model_dump(exclude_none=True)  # echo the config, as Novita does
        self.enqueue(task_id, owner, url, body)

    # --- inspection -----------------------------------------------------------------------------------------

    def deliveries(self, task_id: str) -> list[Delivery]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(_d).where(_d.c.task_id == task_id).order_by(_d.c.created_at)).all()
        return [Delivery(**{k: v for k, v in row._mapping.items() if k != "lease_until"}) for row in rows]

    def count_pending(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_d).where(_d.c.status == PENDING)).scalar_one())

    def purge(self, older_than: float) -> int:
        """Delete delivered/failed rows last updated before ``older_than`` (retention). Returns how many."""
        with self.engine.begin() as conn:
            stmt = delete(_d).where(_d.c.status.in_((DELIVERED, FAILED)), _d.c.updated_at < older_than)
            return int(conn.execute(stmt).rowcount or 0)

    # --- sender ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._client = httpx.Client(
            transport=ssrf.GuardedTransport(self.settings.webhook_allow_hosts, max_connections=self.workers),
            timeout=self.settings.webhook_timeout,
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": USER_AGENT},
        )
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="webhook-send")
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking new rows and wait for attempts in flight (each bounded by the webhook timeout)."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)
        assert self._pool is not None
        assert self._client is not None
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()
        self._thread = self._pool = self._client = None

    def close(self) -> None:
        """Stop, and release the database connections if this dispatcher made its own engine."""
        self.stop()
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> WebhookDispatcher:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                delay = self._dispatch_due()
            except Exception:  # a database hiccup must not kill the sender; try again shortly
                log.exception("webhook dispatcher: could not read the outbox")
                delay = self.poll_interval
            self._wake.wait(delay)

    def _dispatch_due(self) -> float:
        """Hand due rows to the pool; return how long to sleep before looking again."""
        with self._lock:
            inflight = dict(self._inflight)
        free = self.workers - len(inflight)
        per_target = Counter(inflight.values())
        now = self.clock()
        left_waiting = False
        with self.engine.connect() as conn:
            due = conn.execute(
                select(_d.c.id, _d.c.url)
                .where(_d.c.status == PENDING, _d.c.next_attempt_at <= now, _unleased(now))
                .order_by(_d.c.next_attempt_at)
                .limit(_SCAN_WINDOW)
            ).all()
        for delivery_id, url in due:
            if delivery_id in inflight:
                continue
            target = _target(url)
            if free <= 0 or per_target[target] >= self.per_target:
                left_waiting = True  # a finishing attempt wakes the loop
                continue
            if self._claim_and_send(delivery_id, target, now):
                free -= 1
                per_target[target] += 1
        if left_waiting:
            return self.poll_interval
        with self.engine.connect() as conn:
            soonest = conn.execute(
                select(func.min(_d.c.next_attempt_at)).where(_d.c.status == PENDING, _unleased(now))
            ).scalar()
        if soonest is None:
            return self.poll_interval  # also picks up rows other processes add, and expired leases
        return min(self.poll_interval, max(0.0, float(soonest) - self.clock()))

    def _claim_and_send(self, delivery_id: str, target: str, now: float) -> bool:
        claim = (
            update(_d)
            .where(_d.c.id == delivery_id, _d.c.status == PENDING, _unleased(now))
            .values(lease_until=now + self.lease_seconds)
        )
        with self.engine.begin() as conn:
            if conn.execute(claim).rowcount != 1:
                return False  # another dispatcher took it
            row = conn.execute(select(_d).where(_d.c.id == delivery_id)).one()
        with self._lock:
            self._inflight[delivery_id] = target
        assert self._pool is not None
        future = self._pool.submit(self._attempt, delivery_id, dict(row._mapping))
        future.add_done_callback(functools.partial(self._done, delivery_id))
        return True

    def _done(self, delivery_id: str, future: Future[None]) -> None:
        with self._lock:
            self._inflight.pop(delivery_id, None)
        if not future.cancelled() and future.exception() is not None:
            log.error("webhook delivery %s crashed", delivery_id, exc_info=future.exception())
        self._wake.set()

    def _attempt(self, delivery_id: str, row: dict[str, Any]) -> None:
        try:
            ok, error, permanent = self._post(delivery_id, row)
        except Exception as exc:  # e.g. a malformed configured secret: count it, so the row cannot loop forever
            log.exception("webhook delivery %s: unexpected error", delivery_id)
            ok, error, permanent = False, f"internal error: {type(exc).__name__}: {exc}", False
        attempts = int(row["attempts"]) + 1
        now = self.clock()
        values: dict[str, Any] = {"attempts": attempts, "lease_until": None, "updated_at": now, "last_error": error}
        if ok:
            values["status"] = DELIVERED
        elif permanent or attempts > self.settings.webhook_max_retries:
            values["status"] = FAILED
            log.warning(
                "webhook %s for task %s failed after %d attempts: %s", delivery_id, row["task_id"], attempts, error
            )
        else:
            values["next_attempt_at"] = now + self.backoff_base * 2 ** (attempts - 1)
        with self.engine.begin() as conn:
            conn.execute(update(_d).where(_d.c.id == delivery_id).values(**values))

    def _post(self, delivery_id: str, row: dict[str, Any]) -> tuple[bool, str, bool]:
        """One POST. Returns (delivered, error text, permanent failure)."""
        assert self._client is not None
        body = _dumps(row["event"], row["body"])
        headers = {"content-type": "application/json"}
        try:
            headers.update(signature_headers(self.secret_for(row["owner"]), delivery_id, body))
            # Stream so that only the status line is read: a receiver answering with a huge body costs nothing.
            with self._client.stream("POST", row["url"], content=body, headers=headers) as response:
                status = response.status_code
        except ssrf.BlockedDestination as exc:
            return False, f"refused: {exc}", True
        except httpx.TimeoutException:
            return False, f"timed out after {self.settings.webhook_timeout:g} s", False
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}", False
        if 200 <= status < 300:
            return True, "", False
        return False, f"HTTP {status}", False


def result_hook(outbox: WebhookDispatcher, image_urls: ImageUrls) -> TerminalHook:
    """After SUCCEED/FAILED: queue the task's webhook (if it has one) with the body task-result returns."""

    def hook(task: TaskRecord) -> None:
        url = task.extra.webhook_url
        if not url:
            return
        body = task_result_body(task, image_urls.resolver(task.extra.base_url), image_urls.ttl)
        outbox.enqueue(task.task_id, task.owner, url, body)

    return hook
