"""Auth, tenant isolation, task-result shape per status, signed image URLs, error hygiene, collaborators."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.support.api import KEY_A, KEY_B, Submit, auth, body, local_storage, make_services, record_of, task_count
from tests.support.queues import ListQueue

from underpaint.api.app import create_app
from underpaint.delivery.ssrf import InvalidWebhookUrl
from underpaint.engine.job import JobError
from underpaint.services import Services
from underpaint.storage.local import image_key
from underpaint.tasks.contract import Img2ImgRequest, TaskExtra
from underpaint.tasks.types import ImageRecord, NsfwResult, TaskStatus, owner_of
from underpaint.wire.errors import rate_limited
from underpaint.worker.jobs import job_from_request

RESULT = "/v3/async/task-result"


def result(client: TestClient, task_id: str, key: str = KEY_A) -> httpx.Response:
    response: httpx.Response = client.get(RESULT, params={"task_id": task_id}, headers=auth(key))
    return response


# --- auth -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [f"Bearer {KEY_A}", KEY_A, f"bearer  {KEY_A} ", f"BEARER {KEY_A}"])
def test_auth_forms_accepted(client: TestClient, header: str) -> None:
    assert client.get("/v3/model", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({}, 400, "MISSING_API_KEY"),
        ({"Authorization": ""}, 400, "MISSING_API_KEY"),
        ({"Authorization": "Bearer "}, 400, "MISSING_API_KEY"),
        ({"Authorization": "Bearer wrong"}, 403, "INVALID_API_KEY"),
        ({"Authorization": KEY_A[:-1]}, 403, "INVALID_API_KEY"),
        ({"Authorization": f"Basic {KEY_A}"}, 403, "INVALID_API_KEY"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v3/model"), ("GET", RESULT + "?task_id=x"), ("POST", "/v3/async/img2img")]
)
def test_auth_failures(
    client: TestClient, headers: dict[str, str], status: int, reason: str, method: str, path: str
) -> None:
    r = client.request(method, path, headers=headers, json={})
    assert r.status_code == status
    assert r.json() == {"code": status, "reason": reason, "message": r.json()["message"], "metadata": {}}


def test_keys_never_logged(
    client: TestClient,
    submit: Submit,
    caplog: pytest.LogCaptureFixture,
    services: Services,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("store down")

    monkeypatch.setattr(services.store, "create", boom)
    with caplog.at_level(logging.DEBUG):
        submit()
        client.get("/v3/model", headers={"Authorization": "Bearer some-wrong-key"})
    assert "store down" in caplog.text  # the failure is logged ...
    assert KEY_A not in caplog.text
    assert "some-wrong-key" not in caplog.text


def test_tenant_isolation(client: TestClient, submit: Submit, services: Services) -> None:
    task_id = submit(key=KEY_A).json()["task_id"]
    assert record_of(services, task_id).owner == owner_of(KEY_A)  # the hash, never the key
    assert result(client, task_id, KEY_A).status_code == 200
    r = result(client, task_id, KEY_B)
    assert r.status_code == 404
    assert r.json()["reason"] == "TASK_NOT_FOUND"


@pytest.mark.parametrize(("params", "status", "reason"), [
    ({}, 400, "INVALID_REQUEST_BODY"),
    ({"task_id": ""}, 400, "INVALID_REQUEST_BODY"),
    ({"task_id": "no-such-task"}, 404, "TASK_NOT_FOUND"),
    ({"task_id": "x" * 500}, 404, "TASK_NOT_FOUND"),
])  # fmt: skip
def test_task_result_bad_ids(client: TestClient, params: dict[str, str], status: int, reason: str) -> None:
    r = client.get(RESULT, params=params, headers=auth())
    assert r.status_code == status
    assert r.json()["reason"] == reason
    assert r.json()["code"] == status


# --- task-result shape --------------------------------------------------------------------------------------------


def check_shape(data: dict[str, Any], status: str) -> None:
    assert set(data) == {"task", "extra", "images", "videos", "audios"}
    task = data["task"]
    # queue_position is Underpaint's additive extension (docs/compatibility.md); the rest is Novita's shape.
    assert set(task) == {"task_id", "task_type", "status", "reason", "eta", "progress_percent", "queue_position"}
    assert isinstance(task["queue_position"], int)
    assert (task["queue_position"] > 0) == (status == "TASK_STATUS_QUEUED")
    assert task["task_type"] == "IMG_TO_IMG"
    assert task["status"] == status
    assert isinstance(task["eta"], int)
    assert isinstance(task["progress_percent"], int)
    extra = data["extra"]
    assert isinstance(extra["seed"], str)
    assert isinstance(extra["enable_nsfw_detection"], bool)
    assert all(isinstance(v, int) for v in extra["debug_info"].values())
    assert set(extra["debug_info"]) == {"submit_time_ms", "execute_time_ms", "complete_time_ms"}
    assert data["videos"] == []
    assert data["audios"] == []


def test_queued_processing_failed(client: TestClient, submit: Submit, services: Services) -> None:
    task_id = submit(seed=77).json()["task_id"]
    data = result(client, task_id).json()
    check_shape(data, "TASK_STATUS_QUEUED")
    assert data["extra"]["seed"] == "77"
    assert data["images"] == []
    assert data["extra"]["debug_info"]["submit_time_ms"] > 1_600_000_000_000
    assert data["extra"]["debug_info"]["execute_time_ms"] == 0

    services.store.claim(task_id, "w1")
    services.store.update_progress(task_id, "w1", 42, 7)
    data = result(client, task_id).json()
    check_shape(data, "TASK_STATUS_PROCESSING")
    assert (data["task"]["progress_percent"], data["task"]["eta"]) == (42, 7)
    assert data["extra"]["debug_info"]["execute_time_ms"] >= data["extra"]["debug_info"]["submit_time_ms"]

    services.store.fail(task_id, "w1", "")
    data = result(client, task_id).json()
    check_shape(data, "TASK_STATUS_FAILED")
    assert data["task"]["reason"]  # FAILED always carries a reason
    assert data["extra"]["debug_info"]["complete_time_ms"] > 0


def finish(services: Services, task_id: str, images: list[ImageRecord]) -> None:
    services.store.claim(task_id, "w1")
    services.store.complete(task_id, "w1", images)


def test_succeed_with_downloadable_signed_urls(client: TestClient, submit: Submit, services: Services) -> None:
    task_id = submit(extra={"enable_nsfw_detection": True, "response_image_type": "png"}).json()["task_id"]
    keys = [image_key(task_id, "png") for _ in range(2)]
    for i, key in enumerate(keys):
        services.storage.put(key, b"\x89PNG-fake-%d" % i, "image/png")
    finish(services, task_id, [
        ImageRecord(keys[0], "png", NsfwResult(True, 3.2)),
        ImageRecord(keys[1], "png", None),
    ])  # fmt: skip
    data = result(client, task_id).json()
    check_shape(data, "TASK_STATUS_SUCCEED")
    assert data["extra"]["enable_nsfw_detection"] is True
    first, second = data["images"]
    assert first["nsfw_detection_result"] == {"valid": True, "confidence": 3.2}
    assert second["nsfw_detection_result"] is None
    for i, image in enumerate(data["images"]):
        assert image["image_url_ttl"] == 3600
        assert image["image_type"] == "png"
        assert image["image_url"].startswith("http://testserver/v3/files/")
        r = client.get(image["image_url"])  # no Authorization header
        assert r.status_code == 200
        assert r.content == b"\x89PNG-fake-%d" % i
        assert r.headers["content-type"] == "image/png"


def test_signed_url_tampering_and_expiry(client: TestClient, submit: Submit, services: Services) -> None:
    task_id = submit().json()["task_id"]
    key = image_key(task_id, "jpeg")
    services.storage.put(key, b"jpeg-bytes", "image/jpeg")
    finish(services, task_id, [ImageRecord(key, "jpeg")])
    url = result(client, task_id).json()["images"][0]["image_url"]
    assert client.get(url).headers["content-type"] == "image/jpeg"
    head = client.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(b"jpeg-bytes"))
    assert not head.content
    parts = urlsplit(url)
    path, query = parts.path, dict(p.split("=") for p in parts.query.split("&"))
    bad_sig = query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")
    cases = [
        f"{path}?expires={query['expires']}&sig={bad_sig}",
        f"{path}?expires={int(query['expires']) + 60}&sig={query['sig']}",  # extended expiry
        f"{path.replace('.jpeg', '.png')}?expires={query['expires']}&sig={query['sig']}",  # another file
        path,  # unsigned
    ]
    for tampered in cases:
        r = client.get(tampered)
        assert r.status_code == 403, tampered
        assert r.json()["code"] == 403, tampered
    past = 1_000_000
    r = client.get(f"{path}?expires={past}&sig={local_storage(services).sign(key, past)}")
    assert r.status_code == 403
    assert r.json()["reason"] == "URL_EXPIRED"
    services.storage.delete(key)
    r = client.get(url)
    assert r.status_code == 404
    assert r.json()["reason"] == "FILE_NOT_FOUND"


def test_path_traversal_in_file_route(client: TestClient, services: Services, tmp_path: Path) -> None:
    (tmp_path / "outside.png").write_bytes(b"secret")  # sibling of the images root
    for sent, decoded in [("%2e%2e/outside.png", "../outside.png"), ("x/%2e%2e/%2e%2e/outside.png", "x/../../outside.png"),
                          ("..%2foutside.png", "../outside.png")]:  # fmt: skip
        # even a correctly signed traversal key is refused (the signer would never sign one)
        r = client.get(f"/v3/files/{sent}?expires=9999999999&sig={local_storage(services).sign(decoded, 9999999999)}")
        assert r.status_code == 403
        assert r.json()["reason"] == "INVALID_SIGNATURE"
        assert b"secret" not in r.content


def test_public_base_url_and_other_backends(models_dir: Path, tmp_path: Path) -> None:
    services = make_services(
        models_dir,
        tmp_path,
        public_base_url="https://img.example.com/",
        presigners={"s3": lambda image, ttl: f"https://s3.example/{image.key}?ttl={ttl}"},
    )
    client = TestClient(create_app(services), raise_server_exceptions=False)
    task_id = client.post("/v3/async/img2img", json={"request": _minimal()}, headers=auth()).json()["task_id"]
    finish(services, task_id, [ImageRecord(f"{task_id}/a.png", "png"), ImageRecord("k/b.webp", "webp", backend="s3")])
    urls = [i["image_url"] for i in result(client, task_id).json()["images"]]
    assert urls[0].startswith(f"https://img.example.com/v3/files/{task_id}/a.png?expires=")
    assert urls[1] == "https://s3.example/k/b.webp?ttl=3600"
    assert record_of(services, task_id).extra.base_url == "https://img.example.com"


def _minimal() -> dict[str, Any]:
    from tests.support.api import b64, image_bytes

    return {"model_name": "dreamshaper_8", "image_base64": b64(image_bytes()), "prompt": "p"}


# --- 500s never leak -----------------------------------------------------------------------------------------------


def test_result_500_does_not_leak(
    client: TestClient, submit: Submit, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = submit().json()["task_id"]

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("password=hunter2 at /srv/secret.py")

    monkeypatch.setattr(services.store, "get", boom)
    r = result(client, task_id)
    assert r.status_code == 500
    assert r.json()["reason"] == "GET_RESULT_FAILED"
    assert r.json()["code"] == 500
    assert "hunter2" not in r.text
    assert "Traceback" not in r.text
    assert "secret.py" not in r.text


def test_unknown_image_backend_is_a_clean_500(client: TestClient, submit: Submit, services: Services) -> None:
    task_id = submit().json()["task_id"]
    finish(services, task_id, [ImageRecord("x/y.png", "png", backend="gcs")])
    r = result(client, task_id)
    assert r.status_code == 500
    assert r.json()["reason"] == "GET_RESULT_FAILED"
    assert "gcs" not in r.text


def test_submit_500_does_not_leak(submit: Submit, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("dsn=postgres://admin:pw@db")

    monkeypatch.setattr(services.store, "create", boom)
    r = submit()
    assert r.status_code == 500
    assert r.json()["reason"] == "CREATE_TASK_FAILED"
    assert "admin" not in r.text
    assert "Traceback" not in r.text


def test_enqueue_failure_leaves_the_task_queued(
    submit: Submit, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: Any, **k: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(services.queue, "enqueue", boom)
    r = submit()
    # The task is in the store: a worker takes it from there (tests/api/test_submit_outages.py).
    assert r.status_code == 200
    assert services.store.count_by_status()[TaskStatus.QUEUED] == task_count(services) == 1


def test_unknown_route_and_method(client: TestClient) -> None:
    r = client.get("/v3/nothing", headers=auth())
    assert r.status_code == 404
    assert r.json() == {"code": 404, "reason": "API_NOT_FOUND", "message": r.json()["message"], "metadata": {}}
    r = client.get("/v3/async/img2img", headers=auth())
    assert r.status_code == 405
    assert r.json()["code"] == 405
    assert r.json()["reason"] == "METHOD_NOT_ALLOWED"
    r = client.post("/v3/async/task-result?task_id=x", headers=auth())  # a plain Starlette route: same errors
    assert r.status_code == 405
    assert r.json()["reason"] == "METHOD_NOT_ALLOWED"
    assert "allow" in r.headers


# --- collaborators: rate limiter, webhooks, custom storage, health ---------------------------------------------


class Limiter:
    def __init__(self, allow: bool, admit_allows: bool = True) -> None:
        self.allow, self.admit_allows = allow, admit_allows
        self.calls: list[tuple[str, str, int]] = []
        self.tasks_inside_admit: list[int] = []
        self.services: Services | None = None

    def check(self, api_key: str, owner: str, image_num: int) -> None:
        self.calls.append((api_key, owner, image_num))
        if not self.allow:
            raise rate_limited("images per minute exceeded", retry_after=12)

    @contextmanager
    def admit(self, api_key: str, owner: str, image_num: int) -> Iterator[None]:
        if not self.admit_allows:  # another request of this key got in between check and create
            raise rate_limited("images per minute exceeded", retry_after=3)
        assert self.services is not None
        before = task_count(self.services)
        yield
        self.tasks_inside_admit.append(task_count(self.services) - before)


def test_rate_limiter_called_and_429(models_dir: Path, tmp_path: Path, png_b64: str) -> None:
    limiter = Limiter(True)
    services = make_services(models_dir, tmp_path, rate_limiter=limiter)
    limiter.services = services
    client = TestClient(create_app(services), raise_server_exceptions=False)

    def submit(image: str = png_b64, **request: Any) -> httpx.Response:
        response: httpx.Response = client.post("/v3/async/img2img", json=body(image, **request), headers=auth())
        return response

    assert submit(image_num=3).status_code == 200
    assert limiter.calls == [(KEY_A, owner_of(KEY_A), 3)]
    assert limiter.tasks_inside_admit == [1]  # the task was created while admitted
    limiter.allow = False
    r = submit(image="not-even-an-image")  # rate limit is checked before images are decoded
    assert r.status_code == 429
    assert r.json()["reason"] == "RATE_LIMIT_EXCEEDED"
    assert r.headers["retry-after"] == "12"
    limiter.allow, limiter.admit_allows = True, False
    r = submit()
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert task_count(services) == 1


class Webhooks:
    def __init__(self) -> None:
        self.validated: list[str] = []
        self.events: list[dict[str, Any]] = []

    def validate_url(self, url: str) -> None:
        if "127.0.0.1" in url:
            raise InvalidWebhookUrl("extra.webhook.url: private address refused", url=url)
        self.validated.append(url)

    def enqueue(self, task_id: str, owner: str, url: str, body: dict[str, Any]) -> None:
        raise AssertionError("the API never enqueues deliveries itself")

    def submit_test_event(self, task_id: str, owner: str, status: TaskStatus | str, extra: TaskExtra) -> None:
        self.events.append({"task_id": task_id, "owner": owner, "status": status, "extra": extra})


def test_webhooks_disabled(submit: Submit) -> None:
    r = submit(extra={"webhook": {"url": "https://hook.example/x"}})
    assert r.status_code == 400
    assert "not enabled" in r.json()["message"]


def test_webhook_validation_and_test_mode(models_dir: Path, tmp_path: Path, png_b64: str) -> None:
    webhooks = Webhooks()
    queue = ListQueue()
    services = make_services(models_dir, tmp_path, webhooks=webhooks, queue=queue)
    client = TestClient(create_app(services), raise_server_exceptions=False)

    def submit(extra: Any) -> httpx.Response:
        response: httpx.Response = client.post(
            "/v3/async/img2img", json={**body(png_b64), "extra": extra}, headers=auth()
        )
        return response

    r = submit(extra={"webhook": {"url": "http://127.0.0.1:9/x"}})
    assert r.status_code == 400
    assert r.json()["metadata"] == {"url": "http://127.0.0.1:9/x"}
    assert task_count(services) == 0
    task_id = submit(extra={"webhook": {"url": "https://hook.example/x"}}).json()["task_id"]
    assert queue.items[-1][0] == task_id
    assert not webhooks.events
    assert record_of(services, task_id).extra.webhook_url == "https://hook.example/x"
    mode = {"enabled": True, "return_task_status": "TASK_STATUS_FAILED"}
    task_id = submit(extra={"webhook": {"url": "https://hook.example/y", "test_mode": mode}}).json()["task_id"]
    (event,) = webhooks.events
    assert event["task_id"] == task_id
    assert event["status"] == "TASK_STATUS_FAILED"
    assert event["extra"].base_url == "http://testserver"
    assert event["extra"].webhook_url == "https://hook.example/y"
    assert task_id not in [t for t, _ in queue.items]


def test_custom_storage_is_checked_at_submit(submit: Submit, services: Services) -> None:
    s3 = {"region": "us-east-1", "bucket": "mine", "path": "out/"}
    assert submit(extra={"custom_storage": {"aws_s3": s3}}).status_code == 200
    assert submit(extra={"custom_storage": {}}).status_code == 200
    r = submit(extra={"custom_storage": {"aws_s3": s3 | {"bucket": "Not A Bucket!"}}})
    assert r.status_code == 400
    assert r.json()["reason"] == "INVALID_CUSTOM_OUTPUT_PATH"
    assert r.json()["metadata"] == {"bucket": "Not A Bucket!"}
    assert task_count(services) == 2


def test_health(client: TestClient, services: Services) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = replace(services, health=lambda: {"store": "ok", "broker": True})
    with TestClient(create_app(ready)) as c:
        r = c.get("/health")
        assert r.status_code == 200
        assert r.json()["checks"] == {"store": "ok", "broker": True}
    # The broker or the image storage down: the node still accepts tasks (workers take them from the store, and
    # hold their images until the storage is back), so it stays in the load balancer, "degraded".
    degraded = replace(services, health=lambda: {"store": "ok", "broker": "connection refused", "storage": "ok"})
    r = TestClient(create_app(degraded)).get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "degraded"
    no_s3 = replace(services, health=lambda: {"store": "ok", "broker": "ok", "storage": "unreachable: S3 down"})
    assert TestClient(create_app(no_s3)).get("/health").json()["status"] == "degraded"
    down = replace(services, health=lambda: {"store": "unreachable", "broker": "ok", "storage": "ok"})
    r = TestClient(create_app(down)).get("/health")
    assert r.status_code == 503
    assert r.json()["status"] == "unavailable"


# --- jobs ------------------------------------------------------------------------------------------------------


def test_job_from_stored_payload(submit: Submit, services: Services, png_b64: str) -> None:
    r = submit(
        seed=5,
        steps=12,
        sampler_name="dpm++ 2m karras",
        sd_vae="vae-ft-mse-840000",
        loras=[{"model_name": "add_detail", "strength": 0.4}],
        embeddings=[{"model_name": "easynegative"}],
        controlnet={"units": [{"model_name": "control_v11p_sd15_canny", "image_base64": png_b64,
                               "preprocessor": "none", "guidance_end": 0.7}]},
        ip_adapters=[{"model_name": "ip-adapter_sd15", "image_base64": png_b64, "strength": 0.3}],
    )  # fmt: skip
    task_id = r.json()["task_id"]
    job = job_from_request(services.store.get_request(task_id))
    assert job.checkpoint == "dreamshaper_8.safetensors"
    assert job.vae == "vae-ft-mse-840000.safetensors"
    assert (job.seed, job.steps, job.sampler_name, job.strength) == (5, 12, "DPM++ 2M Karras", 0.5)
    assert job.init_image is not None
    assert job.init_image.mode == "RGB"
    assert job.init_image.size == (64, 64)
    assert job.loras[0].name == "add_detail.safetensors"
    assert job.loras[0].strength == 0.4
    assert job.embeddings[0].name == "easynegative.safetensors"
    unit = job.controlnets[0]
    assert unit.model == "control_v11p_sd15_canny.safetensors"
    assert unit.preprocessor is None
    assert (unit.strength, unit.guidance_start, unit.guidance_end) == (1.0, 0.0, 0.7)
    assert job.ip_adapters[0].model == "ip-adapter_sd15.bin"
    assert job.ip_adapters[0].strength == 0.3


def test_job_from_bad_payload_raises_job_error(submit: Submit, services: Services) -> None:
    task_id = submit().json()["task_id"]
    request = services.store.get_request(task_id)
    assert isinstance(request, Img2ImgRequest)
    with pytest.raises(JobError):
        job_from_request(request.model_copy(update={"image_base64": "%%%"}))
    with pytest.raises(JobError):
        job_from_request(request.model_copy(update={"seed": -1}))


def test_with_the_real_rate_limiter_and_custom_storage_check(models_dir: Path, tmp_path: Path, png_b64: str) -> None:
    from underpaint.api.ratelimit import RateLimiter
    from underpaint.config import KeyPolicy

    plain = make_services(models_dir, tmp_path, key_policies={KEY_A: KeyPolicy(images_per_minute=3)})
    services = replace(plain, rate_limiter=RateLimiter(plain.settings, plain.store))
    client = TestClient(create_app(services))
    req = {"model_name": "dreamshaper_8", "image_base64": png_b64, "prompt": "p", "image_num": 2}

    def post(key: str = KEY_A, **extra: Any) -> httpx.Response:
        response: httpx.Response = client.post(
            "/v3/async/img2img", json={"request": req, "extra": extra}, headers=auth(key)
        )
        return response

    assert post().status_code == 200
    r = post()  # 2 + 2 > 3 images per minute
    assert r.status_code == 429
    assert r.json()["reason"] == "RATE_LIMIT_EXCEEDED"
    assert int(r.headers["retry-after"]) >= 1
    assert post(KEY_B).status_code == 200  # other keys are not limited
    s3 = {"region": "us-east-1", "bucket": "Not_A_Bucket", "path": "out"}
    r = post(KEY_B, custom_storage={"aws_s3": s3})
    assert r.status_code == 400
    assert r.json()["reason"] == "INVALID_CUSTOM_OUTPUT_PATH"
    assert post(KEY_B, custom_storage={"aws_s3": s3 | {"bucket": "my-bucket"}}).status_code == 200


def test_no_keys_configured_refuses_everything_and_warns(
    models_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    services = make_services(models_dir, tmp_path, api_keys=())
    assert services.settings.api_keys == ()
    with caplog.at_level(logging.WARNING):
        client = TestClient(create_app(services))
    assert "no API keys configured" in caplog.text
    r = client.get("/v3/model", headers=auth())
    assert r.status_code == 403
    assert r.json()["reason"] == "INVALID_API_KEY"
