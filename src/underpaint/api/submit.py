"""The submit routes (``POST /v3/async/img2img``, ``/v3/async/txt2img``, ``/v3/async/upscale``): validate, resolve models, check images,
create the task, queue it. ``submit`` is the envelope every endpoint shares; an ``Endpoint`` adds its own parsing and
checks (``docs/ARCHITECTURE.md``, "Adding an endpoint").

Order matters for cost: JSON + schema first (cheap), then the rate limit (before any image is decoded), then
model names, then each image is decoded exactly once (nothing is re-encoded: the payload keeps the client's
base64 text), then webhook / custom-storage checks, and only then is the task created and queued.
"""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pydantic import BaseModel

from underpaint.api.auth import Caller
from underpaint.api.context import ApiContext
from underpaint.api.idempotency import idempotency_key, replay
from underpaint.api.schemas import Img2ImgBody, InpaintingBody, Txt2ImgBody, UpscaleBody, parse_body
from underpaint.delivery.ssrf import InvalidWebhookUrl
from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.services import Admission
from underpaint.storage.custom_target import InvalidCustomStorage, custom_target
from underpaint.tasks.contract import (
    INPAINTING_MIN_SIDE,
    GenerationRequest,
    HiresFixIn,
    RefinerIn,
    TaskExtra,
    TaskRequest,
    TaskType,
    Txt2ImgRequest,
    extras_size,
    inpainting_size,
)
from underpaint.tasks.lanes import task_lane, upscale_lane
from underpaint.tasks.lifecycle import announce
from underpaint.tasks.types import IdempotencyKeyTaken, NewTask
from underpaint.vocabulary import LATENT_UPSCALER, missing_annotator_files, missing_annotator_message
from underpaint.wire.errors import ApiError, invalid_image_size, invalid_request
from underpaint.wire.images import INPAINTING_LIMITS, UPSCALE_LIMITS, decode_image, decode_mask

R = TypeVar("R", bound=GenerationRequest)
M = TypeVar("M", bound=BaseModel)

MAX_BODY_BYTES = 100 * 1024 * 1024  # init image + 5 ControlNet images + 1 IP-Adapter image, as base64
DEDICATED_PRIORITY = 10

_KIND_LABELS = {
    "checkpoint": "checkpoint",
    "vae": "VAE",
    "lora": "LoRA",
    "textualinversion": "embedding",
    "controlnet": "ControlNet",
    "ipadapter": "IP-Adapter",
    "upscaler": "upscaler",
}


# Bounds on the shape of a JSON body, far above what a Novita body needs (depth 5, a few dozen objects and
# arrays, a few hundred values) and far below what would exhaust the parser's recursion or the memory of the
# decoded object tree (a 100 MB body of tiny values decodes to gigabytes of Python objects).
MAX_JSON_DEPTH = 32
MAX_JSON_CONTAINERS = 10_000
MAX_JSON_VALUES = 100_000
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400 ``INVALID_REQUEST_BODY`` for anything else, whatever its depth or size."""
    if not raw.strip():
        raise invalid_request('request body is empty; send a JSON object {"extra": {...}, "request": {...}}')
    try:
        text = raw.decode(json.detect_encoding(raw), "surrogatepass")  # what json.loads(bytes) does
    except (UnicodeDecodeError, LookupError):
        raise invalid_request("request body is not valid JSON: not UTF-8, UTF-16 or UTF-32 text") from None
    check_json_shape(text)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise invalid_request(f"request body is not valid JSON: {exc}") from None


def check_json_shape(text: str) -> None:
    """400 when the JSON text nests deeper than ``MAX_JSON_DEPTH`` or holds more than ``MAX_JSON_CONTAINERS``
    objects and arrays or about ``MAX_JSON_VALUES`` values, checked on the text before anything is decoded.

    Iterative and linear: strings are cut out with one regular expression (brackets and commas inside them do not
    count), then the brackets left are counted. A body with few brackets and commas anywhere (every real request:
    the base64 images contain neither) skips even that after two ``str.count`` passes."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH and text.count(",") <= MAX_JSON_VALUES:
        return
    skeleton = _JSON_STRING.sub("0", text)
    depth = 0
    # Only the first brackets need walking: in balanced JSON, more than that is too many containers (refused just
    # below), and json.loads stops at the first unbalanced one.
    for char in _NOT_BRACKET.sub("", skeleton)[: 2 * MAX_JSON_CONTAINERS + 2]:
        depth += 1 if char in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise invalid_request(f"request body nests JSON objects and arrays more than {MAX_JSON_DEPTH} levels deep")
    containers = skeleton.count("[") + skeleton.count("{")
    if containers > MAX_JSON_CONTAINERS:
        raise invalid_request(
            f"request body has {containers} JSON objects and arrays; at most {MAX_JSON_CONTAINERS} are allowed"
        )
    if skeleton.count(",") > MAX_JSON_VALUES:
        raise invalid_request(f"request body has more than {MAX_JSON_VALUES} JSON values")


class SubmitBody(Protocol):
    """A submit body: ``{extra, request}`` with the endpoint's request model."""

    @property
    def extra(self) -> TaskExtra: ...

    @property
    def request(self) -> TaskRequest: ...


B = TypeVar("B", bound=SubmitBody)


@dataclass(frozen=True)
class Prepared:
    """A request checked against this server: model names resolved to registry ``sd_name``s (the seed still as
    the client sent it), and the checkpoint that picks the task's lane (None for an upscale: no checkpoint)."""

    request: TaskRequest
    checkpoint: ModelEntry | None


@dataclass(frozen=True)
class Endpoint(Generic[B]):
    """One submit route: ``parse`` validates the body (a 400 naming the field), ``prepare`` checks the request
    against this server (models, annotators, images; each a 400 naming the field) and resolves its names."""

    task_type: TaskType
    parse: Callable[[Any], B]
    prepare: Callable[[ApiContext, B], Prepared]


def submit(
    ctx: ApiContext,
    caller: Caller,
    raw: bytes,
    base_url: str,
    endpoint: Endpoint[B],
    idempotency_header: str | None = None,
) -> dict[str, str]:
    """Any submit route: the envelope (idempotency, rate limit, webhook and custom-storage checks, seed, lane,
    create, queue) around the endpoint's own ``parse`` and ``prepare``."""
    data = parse_json(raw)
    services = ctx.services
    idem = idempotency_key(idempotency_header, data, endpoint.task_type)
    if idem is not None:
        # A retry of a request already accepted answers at once: no validation, no rate limit, no second task.
        taken = services.store.find_idempotent(caller.owner, idem.key)
        if taken is not None:
            return replay(taken, idem)
    body = endpoint.parse(data)
    extra, image_num = body.extra, body.request.image_num
    if services.rate_limiter is not None:
        services.rate_limiter.check(api_key=caller.api_key, owner=caller.owner, image_num=image_num)
    prepared = endpoint.prepare(ctx, body)

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
            custom_target(extra.custom_storage.aws_s3)
        except InvalidCustomStorage as exc:
            raise ApiError(400, "INVALID_CUSTOM_OUTPUT_PATH", str(exc), dict(exc.metadata)) from None

    stored = prepared.request
    if isinstance(stored, GenerationRequest) and stored.seed < 0:
        stored = stored.model_copy(update={"seed": secrets.randbelow(2**32 - 1)})
    extra = extra.model_copy(update={"base_url": base_url})

    # The lane is the Celery queue in scale-out mode (by base model, or the key's dedicated pool); the embedded
    # worker runs every lane.
    dedicated = caller.policy.dedicated_lane
    if not (extra.enterprise_plan is not None and extra.enterprise_plan.enabled):
        dedicated = None
    if prepared.checkpoint is None:
        lane = upscale_lane(dedicated)
    else:
        lane = task_lane(services.settings, prepared.checkpoint, dedicated)
    priority = DEDICATED_PRIORITY if dedicated else 0

    task_id = str(uuid.uuid4())
    task = NewTask(task_id=task_id, owner=caller.owner, request=stored, extra=extra, lane=lane, priority=priority)
    with _admission(services.rate_limiter, caller, image_num):
        if idem is None:
            services.store.create(task)
        else:
            try:
                services.store.create(task, idem)
            except IdempotencyKeyTaken as taken:  # a concurrent submit with this key won the race
                return replay(taken, idem)
    if test_status is not None and services.webhooks is not None:
        try:
            services.webhooks.submit_test_event(task_id=task_id, owner=caller.owner, status=test_status, extra=extra)
        except Exception:
            services.store.fail(task_id, None, "the test event could not be sent")
            raise
    else:
        # The row is written, so the task is accepted: the message only wakes a worker, and a task whose message
        # could not be sent (broker down) is taken from the store by a worker all the same.
        announce(services.queue, task_id, lane)
    return {"task_id": task_id}


def _prepare_generation(ctx: ApiContext, req: R, init_image: str | None = None) -> tuple[R, ResolvedModels]:
    """The checks every diffusion endpoint shares, cheapest first: models, clip skip, annotators, then each image
    decoded once (``init_image``, the request's ``image_base64``, first)."""
    registry = ctx.services.registry
    names = resolve_models(registry, req)
    _check_clip_skip(registry, names.checkpoint, req.clip_skip)
    _check_preprocessors(registry.models_dir / "annotator", req)
    if init_image is not None:
        decode_image(init_image, "request.image_base64")
    _check_adapter_images(req)
    return names.apply(req), names


def _prepare_img2img(ctx: ApiContext, body: Img2ImgBody) -> Prepared:
    request, names = _prepare_generation(ctx, body.request, body.request.image_base64)
    return Prepared(request, names.checkpoint)


def _prepare_txt2img(ctx: ApiContext, body: Txt2ImgBody) -> Prepared:
    req = body.request
    _check_unavailable_features(req)
    request, names = _prepare_generation(ctx, req)
    registry, settings = ctx.services.registry, ctx.services.settings
    update: dict[str, Any] = {}
    if req.hires_fix is not None:
        update["hires_fix"] = _resolve_hires_fix(registry, req)
    if req.refiner is not None:
        refiner = _resolve_refiner(registry, settings.refiner_checkpoint, req.refiner, names.checkpoint)
        update["refiner"] = req.refiner.model_copy(update={"model_name": refiner.sd_name})
    return Prepared(request.model_copy(update=update), names.checkpoint)


def _prepare_inpainting(ctx: ApiContext, body: InpaintingBody) -> Prepared:
    """Inpainting's own checks: the image and the mask (same size, something to repaint); the processing size
    (``inpainting_size``) becomes the stored request's width and height."""
    req = body.request
    request, names = _prepare_generation(ctx, req)
    image = decode_image(req.image_base64, "request.image_base64", INPAINTING_LIMITS).image
    if min(image.size) < INPAINTING_MIN_SIDE:
        raise invalid_image_size(
            f"request.image_base64: the image is {image.width}x{image.height}; inpainting needs at least "
            f"{INPAINTING_MIN_SIDE} pixels on each side",
            field="request.image_base64",
        )
    field = "request.mask_image_base64"
    mask = decode_mask(req.mask_image_base64, field, INPAINTING_LIMITS)
    if mask.size != image.size:
        raise invalid_request(
            f"{field}: the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
            "send a mask of the image's size",
            field=field,
        )
    low, high = mask.getextrema()
    if (low == 255) if req.inpainting_mask_invert else (high == 0):
        what = "white everywhere, and inverted" if req.inpainting_mask_invert else "black everywhere"
        raise invalid_request(
            f"{field}: the mask is empty ({what}): nothing to repaint; paint the area to repaint white", field=field
        )
    width, height = inpainting_size(image.width, image.height)
    return Prepared(request.model_copy(update={"width": width, "height": height}), names.checkpoint)


def _prepare_upscale(ctx: ApiContext, body: UpscaleBody) -> Prepared:
    """The upscaler resolved and its file checked from its header (``_check_upscaler_file``), then the image
    decoded under the upscale limits."""
    req = body.request
    entry = _resolve_upscaler(ctx.services.registry, req.model_name, "request.model_name")
    image = decode_image(req.image_base64, "request.image_base64", UPSCALE_LIMITS).image
    width, height = extras_size(image.width, image.height, req.scale_factor)
    if min(width, height) < 8:
        field = "request.scale_factor"
        raise invalid_request(
            f"{field}: {image.width}x{image.height} upscaled by {req.scale_factor:g} is {width}x{height} (each side "
            "times the scale, floored to a multiple of 8, as A1111 does); the result needs at least 8 px a side",
            field=field,
        )
    return Prepared(req.model_copy(update={"model_name": entry.sd_name}), None)


IMG2IMG = Endpoint(task_type=TaskType.IMG_TO_IMG, parse=partial(parse_body, Img2ImgBody), prepare=_prepare_img2img)
TXT2IMG = Endpoint(task_type=TaskType.TXT_TO_IMG, parse=partial(parse_body, Txt2ImgBody), prepare=_prepare_txt2img)
INPAINTING = Endpoint(
    task_type=TaskType.INPAINTING, parse=partial(parse_body, InpaintingBody), prepare=_prepare_inpainting
)
UPSCALE = Endpoint(task_type=TaskType.UPSCALE, parse=partial(parse_body, UpscaleBody), prepare=_prepare_upscale)


def submit_img2img(
    ctx: ApiContext, caller: Caller, raw: bytes, base_url: str, idempotency_header: str | None = None
) -> dict[str, str]:
    return submit(ctx, caller, raw, base_url, IMG2IMG, idempotency_header)


def submit_txt2img(
    ctx: ApiContext, caller: Caller, raw: bytes, base_url: str, idempotency_header: str | None = None
) -> dict[str, str]:
    return submit(ctx, caller, raw, base_url, TXT2IMG, idempotency_header)


def submit_upscale(
    ctx: ApiContext, caller: Caller, raw: bytes, base_url: str, idempotency_header: str | None = None
) -> dict[str, str]:
    return submit(ctx, caller, raw, base_url, UPSCALE, idempotency_header)


def _admission(limiter: Admission | None, caller: Caller, image_num: int) -> AbstractContextManager[None]:
    """The limiter's ``admit`` (re-check and hold the owner's lock while the task is created), if there is one.

    The early ``check`` rejects over-limit requests before any image is decoded; ``admit`` closes the
    check-then-create race between concurrent requests of one key in this process."""
    if limiter is None:
        return nullcontext()
    return limiter.admit(api_key=caller.api_key, owner=caller.owner, image_num=image_num)


# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModels:
    """The registry entries of every model a request names, in the request's order."""

    checkpoint: ModelEntry
    vae: ModelEntry | None
    loras: list[ModelEntry]
    embeddings: list[ModelEntry]
    controlnet: list[ModelEntry]
    ip_adapters: list[ModelEntry]

    def apply(self, req: R) -> R:
        """``req`` with each model name replaced by its registry ``sd_name`` (what the worker loads)."""

        def renamed(items: Sequence[M], entries: list[ModelEntry]) -> list[M]:
            return [x.model_copy(update={"model_name": e.sd_name}) for x, e in zip(items, entries, strict=True)]

        update: dict[str, Any] = {
            "model_name": self.checkpoint.sd_name,
            "sd_vae": self.vae.sd_name if self.vae is not None else None,
            "loras": renamed(req.loras, self.loras),
            "embeddings": renamed(req.embeddings, self.embeddings),
            "ip_adapters": renamed(req.ip_adapters, self.ip_adapters),
        }
        if req.controlnet is not None:
            update["controlnet"] = req.controlnet.model_copy(
                update={"units": renamed(req.controlnet.units, self.controlnet)}
            )
        return req.model_copy(update=update)


def resolve_models(registry: ModelRegistry, req: GenerationRequest) -> ResolvedModels:
    """Every model name in the request → registry entry; 400 for unknown names or a mismatched base model."""
    checkpoint = _resolve(registry, "checkpoint", req.model_name, "request.model_name")
    vae = _resolve(registry, "vae", req.sd_vae, "request.sd_vae") if req.sd_vae else None

    def same_base(kind: str, name: str, field: str) -> ModelEntry:
        return _same_base(_resolve(registry, kind, name, field), checkpoint, field, f"{_KIND_LABELS[kind]} {name!r}")

    units = req.controlnet.units if req.controlnet is not None else []
    return ResolvedModels(
        checkpoint=checkpoint,
        vae=vae,
        loras=[same_base("lora", x.model_name, f"request.loras[{i}].model_name") for i, x in enumerate(req.loras)],
        embeddings=[
            same_base("textualinversion", x.model_name, f"request.embeddings[{i}].model_name")
            for i, x in enumerate(req.embeddings)
        ],
        controlnet=[
            same_base("controlnet", u.model_name, f"request.controlnet.units[{i}].model_name")
            for i, u in enumerate(units)
        ],
        ip_adapters=[
            same_base("ipadapter", a.model_name, f"request.ip_adapters[{i}].model_name")
            for i, a in enumerate(req.ip_adapters)
        ],
    )


def _same_base(entry: ModelEntry, checkpoint: ModelEntry, field: str, label: str) -> ModelEntry:
    """``entry`` if it is made for the checkpoint's base model (SD 1.5 or SDXL), else a 400 naming ``field``."""
    if entry.is_sdxl != checkpoint.is_sdxl:
        raise invalid_request(
            f"{field}: {label} is for {entry.base_model} but checkpoint {checkpoint.sd_name!r} is "
            f"{checkpoint.base_model}; pick one made for {checkpoint.base_model}",
            field=field,
        )
    return entry


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


def _check_clip_skip(registry: ModelRegistry, checkpoint: ModelEntry, clip_skip: int) -> None:
    """SD 1.5: ``clip_skip`` (1 = last layer) must name a layer of the checkpoint's text encoder. SDXL ignores
    clip_skip, as A1111 does by default, so any value the schema accepts (1-12) is fine there."""
    if checkpoint.is_sdxl or clip_skip == 1:
        return
    depth = registry.text_encoder_depth(checkpoint)
    if depth is not None and clip_skip > depth:
        raise invalid_request(
            f"request.clip_skip: {clip_skip} is more than the {depth} layers of checkpoint "
            f"{checkpoint.sd_name!r}'s text encoder; use 1 to {depth}",
            field="request.clip_skip",
            text_encoder_layers=depth,
        )


def _check_preprocessors(annotator_dir: Path, req: GenerationRequest) -> None:
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


def _check_adapter_images(req: GenerationRequest) -> None:
    if req.controlnet is not None:
        for i, unit in enumerate(req.controlnet.units):
            decode_image(unit.image_base64, f"request.controlnet.units[{i}].image_base64")
    for i, adapter in enumerate(req.ip_adapters):
        decode_image(adapter.image_base64, f"request.ip_adapters[{i}].image_base64")


# --- txt2img --------------------------------------------------------------------------------------------------------

# What ``restore_faces`` and ``enable_transparent_background`` would need: this build runs neither, so a request
# asking for one is refused, never silently ignored.
_UNAVAILABLE = {
    "restore_faces": "face restoration needs a face-restoration model (GFPGAN or CodeFormer), and none is installed "
    "on this server; send restore_faces false",
    "enable_transparent_background": "a transparent background needs a transparency (LayerDiffuse) model, and none "
    "is installed on this server; send enable_transparent_background false",
}


def _check_unavailable_features(req: Txt2ImgRequest) -> None:
    asked = {"restore_faces": req.restore_faces, "enable_transparent_background": req.enable_transparent_background}
    for name, wanted in asked.items():
        if wanted:
            field = f"request.{name}"
            raise invalid_request(f"{field}: {_UNAVAILABLE[name]}", field=field)


def _resolve_hires_fix(registry: ModelRegistry, req: Txt2ImgRequest) -> HiresFixIn:
    """The target must not be smaller than the first pass; the upscaler is ``Latent`` or an installed upscaler."""
    hires = req.hires_fix
    assert hires is not None
    for axis, target, base in (("width", hires.target_width, req.width), ("height", hires.target_height, req.height)):
        if target < base:
            field = f"request.hires_fix.target_{axis}"
            raise invalid_request(
                f"{field}: {target} is smaller than request.{axis} ({base}); hires fix upscales the first pass, so "
                f"its target must be at least the base size",
                field=field,
            )
    if hires.upscaler.strip().lower() == LATENT_UPSCALER.lower():
        return hires.model_copy(update={"upscaler": LATENT_UPSCALER})
    entry = registry.resolve("upscaler", hires.upscaler)
    if entry is None:
        installed = [e.stem for e in registry.list("upscaler")]
        field = "request.hires_fix.upscaler"
        raise invalid_request(
            f"{field}: unknown upscaler {hires.upscaler!r}; use {LATENT_UPSCALER!r} or one installed in "
            f"models/upscaler/ ({', '.join(installed) if installed else 'none is installed'}; "
            f"GET /v3/model?filter.types=upscaler)",
            field=field,
            model_name=hires.upscaler,
        )
    _check_upscaler_file(registry, entry, "request.hires_fix.upscaler")
    return hires.model_copy(update={"upscaler": entry.sd_name})


def _resolve_upscaler(registry: ModelRegistry, name: str, field: str) -> ModelEntry:
    entry = _resolve(registry, "upscaler", name, field)
    _check_upscaler_file(registry, entry, field)
    return entry


def _check_upscaler_file(registry: ModelRegistry, entry: ModelEntry, field: str) -> None:
    """400 for an upscaler file that is not weights (a saved error page, a damaged header), a pickle naming code, or
    another kind's weights (a VAE, a LoRA, a checkpoint filed as an upscaler), told from its header
    (``registry.weights_problem``, ``registry.misfiled``; the API never imports torch). Readable weights of an
    architecture spandrel does not know are told by the worker, which fails the task naming it."""
    problem = registry.weights_problem(entry) or registry.misfiled(entry)
    if problem is not None:
        raise invalid_request(f"{field}: upscaler {entry.stem!r} cannot be loaded: {problem}", field=field)


def _resolve_refiner(registry: ModelRegistry, setting: str, refiner: RefinerIn, checkpoint: ModelEntry) -> ModelEntry:
    """The request's ``refiner.model_name``, else the ``refiner_checkpoint`` setting, else the first checkpoint whose
    name contains "refiner"; a 400 naming the field (and the setting) when there is none."""
    field = "request.refiner"
    if refiner.model_name is not None:
        entry = _resolve(registry, "checkpoint", refiner.model_name, "request.refiner.model_name")
        field = "request.refiner.model_name"
    elif setting:
        found = registry.resolve("checkpoint", setting)
        if found is None:
            raise invalid_request(
                f"{field}: the server's refiner_checkpoint setting names {setting!r}, which is not an installed "
                "checkpoint; ask the operator to fix UNDERPAINT_REFINER_CHECKPOINT, or name one in "
                "request.refiner.model_name",
                field=field,
            )
        entry = found
    else:
        candidates = [e for e in registry.list("checkpoint") if "refiner" in e.sd_name.lower()]
        if not candidates:
            raise invalid_request(
                f"{field}: no refiner checkpoint is installed (none is named by the refiner_checkpoint setting and "
                "no checkpoint's name contains 'refiner'); install one, or leave refiner out",
                field=field,
            )
        entry = candidates[0]
    return _same_base(entry, checkpoint, field, f"refiner {entry.sd_name!r}")
