"""``POST /v3/async/img2img``: validate, resolve models, check images, create the task, queue it.

Order matters for cost: JSON + schema first (cheap), then the rate limit (before any image is decoded), then
model names, then each image is decoded exactly once (nothing is re-encoded: the payload keeps the client's
base64 text), then webhook / custom-storage checks, and only then is the task created and queued.
"""

from __future__ import annotations

import json
import secrets
import uuid
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from underpaint.api.auth import Caller
from underpaint.api.context import ApiContext
from underpaint.api.schemas import Img2ImgBody, Img2ImgRequest, parse_body
from underpaint.delivery.ssrf import InvalidWebhookUrl
from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.services import Admission
from underpaint.storage.custom import InvalidCustomStorage, validate_custom_storage
from underpaint.tasks.lanes import task_lane
from underpaint.tasks.types import NewTask
from underpaint.vocabulary import missing_annotator_files, missing_annotator_message
from underpaint.wire.errors import ApiError, invalid_request
from underpaint.wire.images import decode_image

MAX_BODY_BYTES = 100 * 1024 * 1024  # init image + 5 ControlNet images + 1 IP-Adapter image, as base64
DEDICATED_PRIORITY = 10

_KIND_LABELS = {
    "checkpoint": "checkpoint",
    "vae": "VAE",
    "lora": "LoRA",
    "textualinversion": "embedding",
    "controlnet": "ControlNet",
    "ipadapter": "IP-Adapter",
}


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise invalid_request('request body is empty; send a JSON object {"extra": {...}, "request": {...}}')
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise invalid_request(f"request body is not valid JSON: {exc}") from None


def submit_img2img(ctx: ApiContext, caller: Caller, raw: bytes, base_url: str) -> dict[str, str]:
    body = parse_body(Img2ImgBody, parse_json(raw))
    req, extra = body.request, body.extra
    services = ctx.services
    if services.rate_limiter is not None:
        services.rate_limiter.check(api_key=caller.api_key, owner=caller.owner, image_num=req.image_num)

    names = resolve_models(services.registry, req)
    _check_preprocessors(services.registry.models_dir / "annotator", req)
    _check_images(req)

    webhook = extra.webhook
    test_status: str | None = None
    if webhook is not None and webhook.test_mode is not None and webhook.test_mode.enabled:
        test_status = webhook.test_mode.return_task_status
    if webhook is not None:
        if services.webhooks is None:
            raise invalid_request("extra.webhook: webhooks are not enabled on this server", field="extra.webhook.url")
        try:
            services.webhooks.validate_url(webhook.url)
        except InvalidWebhookUrl as exc:
            raise invalid_request(str(exc), **({"url": exc.url} if exc.url else {})) from None
    if extra.custom_storage is not None and extra.custom_storage.aws_s3 is not None:
        try:
            validate_custom_storage(extra.custom_storage.model_dump(exclude_none=True))  # {"aws_s3": {...}}
        except InvalidCustomStorage as exc:
            raise ApiError(400, "INVALID_CUSTOM_OUTPUT_PATH", str(exc), dict(exc.metadata)) from None

    seed = req.seed if req.seed >= 0 else secrets.randbelow(2**32 - 1)
    payload = req.model_dump()
    _apply_names(payload, names)
    payload["seed"] = seed
    extra_out = extra.model_dump(exclude_none=True)
    extra_out["_base_url"] = base_url

    # The lane is the Celery queue in scale-out mode (by base model, or the key's dedicated pool); the embedded
    # worker runs every lane.
    dedicated = caller.policy.dedicated_lane
    if not (extra.enterprise_plan is not None and extra.enterprise_plan.enabled):
        dedicated = None
    lane = task_lane(services.settings, names["model_name"], dedicated)
    priority = DEDICATED_PRIORITY if dedicated else 0

    task_id = str(uuid.uuid4())
    with _admission(services.rate_limiter, caller, req.image_num):
        services.store.create(
            NewTask(
                task_id=task_id,
                owner=caller.owner,
                seed=seed,
                enable_nsfw_detection=extra.enable_nsfw_detection,
                response_image_type=extra.response_image_type,
                extra=extra_out,
                payload=payload,
                image_num=req.image_num,
                lane=lane,
                priority=priority,
            )
        )
    try:
        if test_status is not None and services.webhooks is not None:
            services.webhooks.submit_test_event(
                task_id=task_id,
                owner=caller.owner,
                status=test_status,
                extra=extra_out,
                base_url=base_url,
            )
        else:
            services.queue.enqueue(task_id, lane)
    except Exception:
        # Never leave a task QUEUED that no worker was told about.
        services.store.fail(task_id, None, "the task could not be queued")
        raise
    return {"task_id": task_id}


def _admission(limiter: Admission | None, caller: Caller, image_num: int) -> AbstractContextManager[None]:
    """The limiter's ``admit`` (re-check and hold the owner's lock while the task is created), if there is one.

    The early ``check`` rejects over-limit requests before any image is decoded; ``admit`` closes the
    check-then-create race between concurrent requests of one key in this process."""
    if limiter is None:
        return nullcontext()
    return limiter.admit(api_key=caller.api_key, owner=caller.owner, image_num=image_num)


# ---------------------------------------------------------------------------------------------------------------


def resolve_models(registry: ModelRegistry, req: Img2ImgRequest) -> dict[str, Any]:
    """Every model name in the request → registry entry; 400 for unknown names or a mismatched base model."""
    checkpoint = _resolve(registry, "checkpoint", req.model_name, "request.model_name")
    vae = _resolve(registry, "vae", req.sd_vae, "request.sd_vae") if req.sd_vae else None

    def same_base(kind: str, name: str, field: str) -> ModelEntry:
        entry = _resolve(registry, kind, name, field)
        if entry.is_sdxl != checkpoint.is_sdxl:
            raise invalid_request(
                f"{field}: {_KIND_LABELS[kind]} {name!r} is for {entry.base_model} but checkpoint "
                f"{checkpoint.sd_name!r} is {checkpoint.base_model}; pick one made for {checkpoint.base_model}",
                field=field,
            )
        return entry

    units = req.controlnet.units if req.controlnet is not None else []
    return {
        "model_name": checkpoint,
        "sd_vae": vae,
        "loras": [same_base("lora", x.model_name, f"request.loras[{i}].model_name") for i, x in enumerate(req.loras)],
        "embeddings": [
            same_base("textualinversion", x.model_name, f"request.embeddings[{i}].model_name")
            for i, x in enumerate(req.embeddings)
        ],
        "controlnet": [
            same_base("controlnet", u.model_name, f"request.controlnet.units[{i}].model_name")
            for i, u in enumerate(units)
        ],
        "ip_adapters": [
            same_base("ipadapter", a.model_name, f"request.ip_adapters[{i}].model_name")
            for i, a in enumerate(req.ip_adapters)
        ],
    }


def _resolve(registry: ModelRegistry, kind: str, name: str, field: str) -> ModelEntry:
    entry = registry.resolve(kind, name)
    if entry is None:
        raise invalid_request(
            f"{field}: unknown {_KIND_LABELS[kind]} {name!r}; list the available ones with "
            f"GET /v3/model?filter.types={kind}",
            field=field,
            model_name=name,
        )
    return entry


def _apply_names(payload: dict[str, Any], names: dict[str, Any]) -> None:
    payload["model_name"] = names["model_name"].sd_name
    if names["sd_vae"] is not None:
        payload["sd_vae"] = names["sd_vae"].sd_name
    for key in ("loras", "embeddings", "ip_adapters"):
        for item, entry in zip(payload[key], names[key], strict=True):
            item["model_name"] = entry.sd_name
    if payload.get("controlnet"):
        for unit, entry in zip(payload["controlnet"]["units"], names["controlnet"], strict=True):
            unit["model_name"] = entry.sd_name


def _check_preprocessors(annotator_dir: Path, req: Img2ImgRequest) -> None:
    """Refuse a unit whose preprocessor needs annotator weights that are not installed (naming the files)."""
    if req.controlnet is None:
        return
    for i, unit in enumerate(req.controlnet.units):
        name = unit.preprocessor
        missing = missing_annotator_files(name, annotator_dir)
        if name is not None and missing:
            field = f"request.controlnet.units[{i}].preprocessor"
            problem = missing_annotator_message(name, missing, annotator_dir)
            raise invalid_request(f"{field}: {problem}", field=field)


def _check_images(req: Img2ImgRequest) -> None:
    decode_image(req.image_base64, "request.image_base64")
    if req.controlnet is not None:
        for i, unit in enumerate(req.controlnet.units):
            decode_image(unit.image_base64, f"request.controlnet.units[{i}].image_base64")
    for i, adapter in enumerate(req.ip_adapters):
        decode_image(adapter.image_base64, f"request.ip_adapters[{i}].image_base64")
