"""Webhook delivery against a real HTTP receiver on 127.0.0.1 (allowlisted in the test settings)."""

from __future__ import annotations

import base64
import io
import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from standardwebhooks import Webhook
from tests.support.requests import img2img
from tests.support.services import database_url
from tests.support.webhook_receiver import Receiver, running_receiver, signature_ok, wait_for

from underpaint.config import KeyPolicy, Settings
from underpaint.delivery import ssrf
from underpaint.delivery.sample_event import FAILED_REASON
from underpaint.delivery.signing import derive_secret, make_secret_for, normalize_secret, sign, signature_headers
from underpaint.delivery.ssrf import InvalidWebhookUrl
from underpaint.delivery.webhooks import DELIVERED, FAILED, PENDING, WebhookDispatcher
from underpaint.tasks.contract import TaskExtra
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import NewTask, TaskStatus
from underpaint.wire.result import task_result_body

SERVER_SECRET = b"test-server-secret"
OWNER = "owner-hash-1"


def secret_for(owner: str) -> str:
    return derive_secret(SERVER_SECRET, owner)


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"webhook_allow_hosts": ("127.0.0.1",), "webhook_timeout": 0.3, "webhook_max_retries": 5}
    base.update(overrides)
    return Settings(**base)


def result_body(task_id: str, status: str = "TASK_STATUS_SUCCEED") -> dict[str, Any]:
    return {
        "extra": {"seed": "42", "enable_nsfw_detection": False, "debug_info": {"request_info": ""}},
        "task": {"task_id": task_id, "status": status, "reason": "", "task_type": "IMG_TO_IMG", "eta": 0,
                 "progress_percent": 0},
        "images": [{"image_url": "http://127.0.0.1/x.png", "image_url_ttl": 3600, "image_type": "png",
                    "nsfw_detection_result": None}],
        "videos": [],
        "audios": [],
    }  # fmt: skip


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The outbox on SQLite (embedded) and on PostgreSQL (scale-out), in a fresh schema per test."""
    with database_url(request.param, tmp_path / "underpaint.db", "wh_") as url:
        yield url


@pytest.fixture
def dispatcher(db_url: str) -> Iterator[WebhookDispatcher]:
    d = WebhookDispatcher(db_url, settings(), secret_for, backoff_base=0.02, poll_interval=0.05)
    d.start()
    yield d
    d.close()


def final(d: WebhookDispatcher, task_id: str, timeout: float = 10.0) -> str:
    assert wait_for(lambda: d.deliveries(task_id)[0].status != PENDING, timeout), "delivery never finished"
    return d.deliveries(task_id)[0].status


def test_payload_is_the_task_result_body(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    body = result_body("t1")
    dispatcher.enqueue("t1", OWNER, receiver.url, body)
    assert final(dispatcher, "t1") == DELIVERED
    assert receiver.count() == 1
    got = receiver.requests[0]
    assert got.path == "/hook"
    assert got.headers["content-type"] == "application/json"
    event = json.loads(got.body)
    assert event["event_type"] == "ASYNC_TASK_RESULT"
    expected = json.loads(json.dumps(body))
    expected["extra"]["webhook"] = {"url": receiver.url}  # the payload echoes the webhook config
    assert event["payload"] == expected
    row = dispatcher.deliveries("t1")[0]
    assert (row.attempts, row.last_error) == (1, "")


def test_existing_webhook_echo_is_kept(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    body = result_body("t1")
    body["extra"]["webhook"] = {"url": receiver.url, "test_mode": {"enabled": False}}
    dispatcher.enqueue("t1", OWNER, receiver.url, body)
    assert final(dispatcher, "t1") == DELIVERED
    assert json.loads(receiver.requests[0].body)["payload"]["extra"]["webhook"] == body["extra"]["webhook"]


def test_retries_after_500_then_succeeds(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    receiver.fail_first = 2
    dispatcher.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    assert final(dispatcher, "t1") == DELIVERED
    assert receiver.count() == 3
    assert dispatcher.deliveries("t1")[0].attempts == 3
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert len(ids) == 1  # the message id is stable across retries, so receivers can deduplicate


def test_retries_after_timeout(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    receiver.hang_first, receiver.hang_seconds = 1, 1.5  # longer than the 0.3 s test timeout
    dispatcher.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    assert final(dispatcher, "t1") == DELIVERED
    assert receiver.count() == 2
    assert dispatcher.deliveries("t1")[0].attempts == 2


def test_gives_up_after_five_retries(db_url: str, receiver: Receiver) -> None:
    receiver.fail_first = 100
    with WebhookDispatcher(db_url, settings(), secret_for, backoff_base=0.01, poll_interval=0.05) as d:
        d.enqueue("t1", OWNER, receiver.url, result_body("t1"))
        assert final(d, "t1") == FAILED
        time.sleep(0.3)  # no attempt after giving up
    row = d.deliveries("t1")[0]
    assert receiver.count() == 6  # the first attempt plus 5 retries
    assert (row.attempts, row.last_error) == (6, "HTTP 500")


def test_backoff_grows_exponentially(db_url: str, receiver: Receiver) -> None:
    receiver.fail_first = 100
    with WebhookDispatcher(db_url, settings(webhook_max_retries=3), secret_for, backoff_base=0.2,
                           poll_interval=0.05) as d:  # fmt: skip
        d.enqueue("t1", OWNER, receiver.url, result_body("t1"))
        assert final(d, "t1") == FAILED
    times = [r.at for r in receiver.requests]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    for gap, expected in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert expected - 0.02 <= gap < expected + 0.5


def test_resumes_pending_delivery_after_restart(db_url: str, receiver: Receiver) -> None:
    # Enqueued by a process that never sent it (e.g. a worker that died right after finishing the task).
    first = WebhookDispatcher(db_url, settings(), secret_for)
    first.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    assert receiver.count() == 0
    with WebhookDispatcher(db_url, settings(), secret_for, poll_interval=0.05) as second:
        assert final(second, "t1") == DELIVERED
    assert receiver.count() == 1


def test_resumes_a_retry_after_restart(db_url: str, receiver: Receiver) -> None:
    receiver.fail_first = 1
    first = WebhookDispatcher(db_url, settings(), secret_for, backoff_base=0.5, poll_interval=0.05)
    first.start()
    first.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    assert wait_for(lambda: first.deliveries("t1")[0].attempts == 1)
    first.stop()
    assert first.deliveries("t1")[0].status == PENDING
    with WebhookDispatcher(db_url, settings(), secret_for, poll_interval=0.05) as second:
        assert final(second, "t1") == DELIVERED
    assert receiver.count() == 2
    assert receiver.requests[1].at - receiver.requests[0].at >= 0.45  # the stored backoff is honoured


@pytest.mark.parity
def test_signature_verifies(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    dispatcher.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    assert final(dispatcher, "t1") == DELIVERED
    got = receiver.requests[0]
    secret = secret_for(OWNER)
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.headers["webhook-id"] == dispatcher.deliveries("t1")[0].id
    assert abs(int(got.headers["webhook-timestamp"]) - time.time()) < 60
    assert signature_ok(got.body, got.headers, secret)
    assert not signature_ok(got.body.replace(b'"t1"', b'"t2"'), got.headers, secret)  # tampered body
    assert not signature_ok(got.body, got.headers, secret_for("someone-else"))
    assert not signature_ok(got.body, {**got.headers, "webhook-id": "msg_other"}, secret)
    stale = signature_headers(secret, "msg_1", got.body, timestamp=int(time.time()) - 3600)
    assert not signature_ok(got.body, stale, secret)  # a replay an hour later


def test_secrets_per_key() -> None:
    assert derive_secret(SERVER_SECRET, "a") == derive_secret(SERVER_SECRET, "a")
    assert derive_secret(SERVER_SECRET, "a") != derive_secret(SERVER_SECRET, "b")
    assert derive_secret(SERVER_SECRET, "a") != derive_secret(b"other server", "a")
    assert derive_secret(SERVER_SECRET, "a").startswith("whsec_")
    own = base64.b64encode(b"key-1's own 24+ byte secret").decode()
    policies = {"key-1": KeyPolicy(webhook_secret=own), "key-2": KeyPolicy()}
    lookup = make_secret_for(Settings(key_policies=policies), SERVER_SECRET, owner_of=lambda key: "h:" + key)
    assert lookup("h:key-1") == "whsec_" + own
    assert lookup("h:key-2") == derive_secret(SERVER_SECRET, "h:key-2")


KEY = b"\x00\xffa 32-byte signing key, binary\x80"
SECRET_FORMS = {
    "whsec_ + base64": "whsec_" + base64.b64encode(KEY).decode(),
    "bare base64": base64.b64encode(KEY).decode(),
    "unpadded": base64.b64encode(KEY).decode().rstrip("="),
    "trailing newline": "whsec_" + base64.b64encode(KEY).decode() + "\n",
}


@pytest.mark.parity
@pytest.mark.parametrize("secret", SECRET_FORMS.values(), ids=SECRET_FORMS.keys())
def test_secret_forms_sign_as_the_reference_library_does(secret: str) -> None:
    """Every form keys the HMAC with the base64-decoded bytes, as ``standardwebhooks.Webhook`` does."""
    body = json.dumps({"event_type": "ASYNC_TASK_RESULT", "payload": {"task": {"task_id": "é"}}}).encode()
    now = int(time.time())
    ours = sign(secret, "msg_1", now, body)
    reference = Webhook(secret.strip()).sign("msg_1", datetime.fromtimestamp(now, tz=UTC), body.decode())
    assert ours == reference
    assert signature_ok(body, signature_headers(secret, "msg_1", body, now), SECRET_FORMS["whsec_ + base64"])
    assert normalize_secret(secret) == SECRET_FORMS["whsec_ + base64"]


@pytest.mark.parametrize("secret", ["my-own-secret text", "whsec_not base64!", "whsec_", "", "whsec_QQ=x"])
def test_secrets_that_are_not_base64_are_refused_at_startup(secret: str) -> None:
    policies = {"key-1": KeyPolicy(webhook_secret=secret or " ")}
    with pytest.raises(ValueError, match="webhook secret must"):
        make_secret_for(Settings(key_policies=policies), SERVER_SECRET, owner_of=lambda key: "h:" + key)


def test_unexpected_sender_error_counts_as_an_attempt(db_url: str, receiver: Receiver) -> None:
    def broken_secret(owner: str) -> str:
        raise ValueError("webhook secret must be 'whsec_' followed by base64")

    with WebhookDispatcher(db_url, settings(webhook_max_retries=1), broken_secret, backoff_base=0.01,
                           poll_interval=0.05) as d:  # fmt: skip
        d.enqueue("t1", OWNER, receiver.url, result_body("t1"))
        assert final(d, "t1") == FAILED
    row = d.deliveries("t1")[0]
    assert row.attempts == 2
    assert "whsec_" in row.last_error
    assert receiver.count() == 0


def test_enqueue_is_idempotent_per_task(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    dispatcher.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    dispatcher.enqueue("t1", OWNER, receiver.url, result_body("t1"))  # e.g. a broker delivered the task twice
    assert final(dispatcher, "t1") == DELIVERED
    time.sleep(0.2)
    assert len(dispatcher.deliveries("t1")) == 1
    assert receiver.count() == 1


def test_enqueue_never_waits_for_a_hanging_receiver(db_url: str, receiver: Receiver) -> None:
    receiver.hang_first, receiver.hang_seconds = 1000, 2.0
    with WebhookDispatcher(db_url, settings(webhook_timeout=1.0), secret_for, workers=2) as d:
        started = time.monotonic()
        for i in range(10):
            d.enqueue(f"t{i}", OWNER, receiver.url, result_body(f"t{i}"))
        elapsed = time.monotonic() - started
        assert wait_for(lambda: receiver.count() >= 2)
    assert elapsed < 1.0  # sending inline would take at least 10 x 1 s


def test_one_hanging_receiver_does_not_hold_up_others(db_url: str, receiver: Receiver) -> None:
    receiver.hang_first, receiver.hang_seconds = 1000, 2.0
    with running_receiver() as healthy:
        d = WebhookDispatcher(db_url, settings(webhook_timeout=1.0), secret_for, workers=4, per_target=2,
                              poll_interval=0.05)  # fmt: skip
        with d:
            for i in range(6):
                d.enqueue(f"slow{i}", OWNER, receiver.url, result_body(f"slow{i}"))
            time.sleep(0.2)
            d.enqueue("fast", OWNER, healthy.url, result_body("fast"))
            assert final(d, "fast", timeout=0.8) == DELIVERED
            assert receiver.count() == 2  # the hanging receiver gets no more than its share of senders


def test_sender_sleeps_while_all_senders_are_busy(
    db_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver.hang_first, receiver.hang_seconds = 1000, 2.0
    d = WebhookDispatcher(db_url, settings(webhook_timeout=1.0), secret_for, workers=1, poll_interval=0.5)
    passes = 0
    dispatch = d._dispatch_due

    def counting() -> float:
        nonlocal passes
        passes += 1
        return dispatch()

    monkeypatch.setattr(d, "_dispatch_due", counting)
    with d:
        for i in range(3):
            d.enqueue(f"t{i}", OWNER, receiver.url, result_body(f"t{i}"))
        time.sleep(0.8)  # one attempt hangs; two rows are due but have no sender
        assert receiver.count() == 1
    assert passes < 10  # woken by enqueues and the poll interval, not spinning


def test_connect_time_ssrf_check_defeats_rebinding(
    db_url: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])  # public when submitted, loopback when delivered
    monkeypatch.setattr(ssrf, "resolve", lambda host, port: next(answers))
    url = f"http://rebind.example:{receiver.port}/hook"
    with WebhookDispatcher(db_url, settings(webhook_allow_hosts=()), secret_for, poll_interval=0.05) as d:
        d.validate_url(url)  # passes: the name looked public at submit
        d.enqueue("t1", OWNER, url, result_body("t1"))
        assert final(d, "t1") == FAILED
    row = d.deliveries("t1")[0]
    assert "refused" in row.last_error
    assert "loopback" in row.last_error
    assert row.attempts == 1  # a refused target is not retried
    assert receiver.count() == 0


def test_validate_url_uses_the_allowlist(db_url: str) -> None:
    open_ = WebhookDispatcher(db_url, settings(), secret_for)
    open_.validate_url("http://127.0.0.1:9/hook")
    closed = WebhookDispatcher(db_url, settings(webhook_allow_hosts=()), secret_for)
    with pytest.raises(InvalidWebhookUrl, match="loopback"):
        closed.validate_url("http://127.0.0.1:9/hook")


# --- test mode ----------------------------------------------------------------------------------------------


class MemoryStorage:
    name = "local"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.files[key] = data

    def get(self, key: str) -> bytes:
        return self.files[key]

    def url(self, key: str, ttl: int, base_url: str) -> str:
        return f"{base_url}/v3/files/{key}?ttl={ttl}"

    def delete(self, key: str) -> None:
        self.files.pop(key, None)


@pytest.fixture
def task_store(db_url: str) -> Iterator[SqlTaskStore]:
    store = SqlTaskStore(db_url)  # the real task store, in the same database as the outbox
    yield store
    store.close()


def _test_mode(
    store: SqlTaskStore, db_url: str, status: str, url: str
) -> tuple[WebhookDispatcher, MemoryStorage, TaskExtra]:
    webhook = {"url": url, "test_mode": {"enabled": True, "return_task_status": status}}
    extra = TaskExtra.model_validate({"webhook": webhook, "_base_url": "http://testserver"})
    store.create(NewTask("tm1", OWNER, img2img(seed=1234), extra))
    storage = MemoryStorage()
    d = WebhookDispatcher(db_url, settings(), secret_for, storage=storage, store=store, poll_interval=0.05)
    return d, storage, extra


def test_test_mode_succeed(task_store: SqlTaskStore, db_url: str, receiver: Receiver) -> None:
    d, storage, extra = _test_mode(task_store, db_url, "TASK_STATUS_SUCCEED", receiver.url)
    with d:
        d.submit_test_event("tm1", OWNER, "TASK_STATUS_SUCCEED", extra)
        record = task_store.get("tm1")
        assert record is not None
        assert record.status is TaskStatus.SUCCEED
        assert not task_store.complete_unleased("tm1", [])  # an ended task stays as it is
        assert final(d, "tm1") == DELIVERED
    payload = json.loads(receiver.requests[0].body)["payload"]
    polled = task_result_body(record, lambda image: storage.url(image.key, 3600, "http://testserver"), 3600)
    webhook = {"url": receiver.url, "test_mode": {"enabled": True, "return_task_status": "TASK_STATUS_SUCCEED"}}
    assert payload == {**polled, "extra": {**polled["extra"], "webhook": webhook}}
    assert payload["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert payload["task"]["reason"] == ""
    assert payload["extra"]["seed"] == "1234"
    [image] = payload["images"]
    key = record.images[0].key
    assert image["image_url"] == storage.url(key, 3600, "http://testserver")
    assert (image["image_url_ttl"], image["image_type"], image["nsfw_detection_result"]) == (3600, "png", None)
    assert Image.open(io.BytesIO(storage.files[key])).size == (64, 64)  # a real image behind the URL


def test_test_mode_failed(task_store: SqlTaskStore, db_url: str, receiver: Receiver) -> None:
    d, storage, extra = _test_mode(task_store, db_url, "TASK_STATUS_FAILED", receiver.url)
    with d:
        d.submit_test_event("tm1", OWNER, TaskStatus.FAILED, extra)
        record = task_store.get("tm1")
        assert record is not None
        assert (record.status, record.reason) == (TaskStatus.FAILED, FAILED_REASON)
        assert final(d, "tm1") == DELIVERED
    payload = json.loads(receiver.requests[0].body)["payload"]
    assert payload["task"]["status"] == "TASK_STATUS_FAILED"
    assert payload["task"]["reason"] == FAILED_REASON
    assert payload["images"] == []
    assert payload["videos"] == []
    assert payload["audios"] == []
    assert extra.webhook is not None
    assert payload["extra"]["webhook"] == extra.webhook.model_dump()
    assert storage.files == {}


def test_test_mode_rejects_a_non_terminal_status(task_store: SqlTaskStore, db_url: str, receiver: Receiver) -> None:
    d, _storage, extra = _test_mode(task_store, db_url, "TASK_STATUS_SUCCEED", receiver.url)
    with pytest.raises(ValueError, match="SUCCEED or FAILED"):
        d.submit_test_event("tm1", OWNER, "TASK_STATUS_QUEUED", extra)
    assert d.deliveries("tm1") == []


def test_purge_removes_finished_rows_only(dispatcher: WebhookDispatcher, receiver: Receiver) -> None:
    dispatcher.enqueue("t1", OWNER, receiver.url, result_body("t1"))
    assert final(dispatcher, "t1") == DELIVERED
    dispatcher.stop()
    dispatcher.enqueue("t2", OWNER, receiver.url, result_body("t2"))
    assert dispatcher.purge(time.time() + 1) == 1
    assert dispatcher.deliveries("t1") == []
    assert dispatcher.count_pending() == 1
