"""The typed task contract: what a client asked for, as the API accepts it, the store keeps it and a worker runs it.

One pydantic model per endpoint, told apart by ``task_type`` (the wire name task-result reports):

- ``Img2ImgRequest`` (``IMG_TO_IMG``), ``Txt2ImgRequest`` (``TXT_TO_IMG``), ``InpaintingRequest``
  (``INPAINTING``), ``UpscaleRequest`` (``UPSCALE``: no diffusion) (``docs/ARCHITECTURE.md``, "Adding an endpoint").
- ``TaskExtra``: the body's ``extra`` object (output format, NSFW, webhook, custom storage ...), plus the base URL
  the task was submitted on (image URLs in webhooks point there).

The API validates the client's ``request`` with the endpoint's model, resolves model names to registry
``sd_name``s and the seed to a number, and stores the result; the store serialises it once (``dump_request``) and
reads it back as the same typed model (``load_request``); the worker turns it into an engine job. A row stored
before ``task_type`` existed has none: it loads as ``IMG_TO_IMG``, the only endpoint there was. Batch
compatibility is derived from these models in ``tasks.batching``.

Torch-free: the API side imports this.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from underpaint.tasks.fields import (
    STORED,
    Base64,
    Checked,
    Lenient,
    ModelName,
    Preprocessor,
    Sampler,
    Scheduler,
    Seed,
    Unit,
    at_most,
    in_range,
    length,
)
from underpaint.vocabulary import LATENT_UPSCALER, SamplerName


class TaskType(enum.StrEnum):
    """``task.task_type`` in task-result; also the discriminator of ``TaskRequest``."""

    IMG_TO_IMG = "IMG_TO_IMG"
    TXT_TO_IMG = "TXT_TO_IMG"
    INPAINTING = "INPAINTING"
    UPSCALE = "UPSCALE"


IMAGE_TYPES = ("png", "webp", "jpeg")
TASK_STATUSES = ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED")


# --- request parts ---------------------------------------------------------------------------------------------


class LoraIn(Lenient):
    model_name: ModelName
    strength: Unit = 1.0


class EmbeddingIn(Lenient):
    model_name: ModelName


class ControlNetUnitIn(Lenient):
    model_name: ModelName
    image_base64: Base64
    strength: Unit = 1.0
    preprocessor: Preprocessor = None
    guidance_start: Unit = 0.0
    guidance_end: Unit = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> ControlNetUnitIn:
        if self.guidance_start >= self.guidance_end:
            raise PydanticCustomError(
                "bad_guidance_window",
                "guidance_start ({s}) must be less than guidance_end ({e})",
                {"s": self.guidance_start, "e": self.guidance_end},
            )
        return self


class ControlNetIn(Lenient):
    units: Annotated[list[ControlNetUnitIn], at_most(5)]

    @model_validator(mode="after")
    def _not_empty(self) -> ControlNetIn:
        if not self.units:
            raise PydanticCustomError("no_units", "controlnet.units must contain at least one unit")
        return self


class IPAdapterIn(Lenient):
    model_name: ModelName
    image_base64: Base64
    strength: Unit = 1.0


# --- requests, one per endpoint ----------------------------------------------------------------------------------


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


class GenerationRequest(Lenient):
    """The fields every diffusion endpoint shares (Novita's ranges and the SDKs' defaults)."""

    model_name: ModelName
    prompt: Annotated[str, length(1, 1024)]
    negative_prompt: Annotated[str, length(0, 1024)] = ""
    width: Annotated[int, in_range(128, 2048)] = 512
    height: Annotated[int, in_range(128, 2048)] = 512
    image_num: Annotated[int, in_range(1, 8)] = 1
    steps: Annotated[int, in_range(1, 100)] = 20
    guidance_scale: Annotated[float, in_range(1, 30)] = 7.5
    sampler_name: Sampler = SamplerName("Euler a")
    # A1111 >= 1.9's "Schedule type"; absent: the sampler name means what it meant in A1111 <= 1.8.
    scheduler: Scheduler = None
    seed: Seed = -1
    sd_vae: Annotated[ModelName | None, BeforeValidator(_blank_is_none)] = None  # "" (Python SDK): none
    clip_skip: Annotated[int, in_range(1, 12)] = 1
    loras: Annotated[list[LoraIn], at_most(5)] = Field(default_factory=list)
    embeddings: Annotated[list[EmbeddingIn], at_most(5)] = Field(default_factory=list)
    controlnet: ControlNetIn | None = None
    ip_adapters: Annotated[list[IPAdapterIn], at_most(1)] = Field(default_factory=list)


class Img2ImgRequest(GenerationRequest):
    """``POST /v3/async/img2img``."""

    task_type: SkipJsonSchema[Literal[TaskType.IMG_TO_IMG]] = TaskType.IMG_TO_IMG
    image_base64: Base64
    strength: Unit = 0.5


class HiresFixIn(Lenient):
    """txt2img's second pass (A1111 >= 1.6 hires fix). ``upscaler``: ``Latent`` or an upscaler model (the names
    Novita documents, or any file in ``models/upscaler/``), checked against the registry at submit and stored as
    its ``sd_name``."""

    target_width: Annotated[int, in_range(128, 4096)]
    target_height: Annotated[int, in_range(128, 4096)]
    strength: Unit = 0.5
    upscaler: ModelName = LATENT_UPSCALER


class RefinerIn(Lenient):
    """SDXL refiner (A1111 >= 1.7). ``model_name`` is an extension: without it the server's ``refiner_checkpoint``
    setting (default: the checkpoint whose name contains "refiner") is used. Stored with the checkpoint resolved."""

    switch_at: Unit = 0.5
    model_name: ModelName | None = None


class Txt2ImgRequest(GenerationRequest):
    """``POST /v3/async/txt2img``. ControlNet units and IP-Adapters (from ``GenerationRequest``) are additive:
    Novita's txt2img body has none. ``restore_faces`` and ``enable_transparent_background`` are accepted; the API
    refuses them with a 400 naming what is missing while no model for them is installed."""

    task_type: SkipJsonSchema[Literal[TaskType.TXT_TO_IMG]] = TaskType.TXT_TO_IMG
    hires_fix: HiresFixIn | None = None
    refiner: RefinerIn | None = None
    restore_faces: bool = False
    enable_transparent_background: bool = False


# Inpainting's on/off fields: Novita documents 0/1, the Python SDK sends booleans; both are accepted (and stored
# as booleans).
Flag = Annotated[bool, WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "integer", "enum": [0, 1]}]})]
INPAINTING_MIN_SIDE = 64


class InpaintingRequest(GenerationRequest):
    """``POST /v3/async/inpainting``. Novita's body has no width/height: the API sets them from the image, to the
    processing size (``inpainting_size``); the output keeps the image's own size."""

    task_type: SkipJsonSchema[Literal[TaskType.INPAINTING]] = TaskType.INPAINTING
    width: SkipJsonSchema[int] = 0  # set by the API from the image, not by the client
    height: SkipJsonSchema[int] = 0
    image_base64: Base64
    mask_image_base64: Base64
    strength: Unit = 1.0
    mask_blur: Annotated[int, in_range(0, 64)] = 4
    inpainting_full_res: Flag = False
    inpainting_full_res_padding: Annotated[int, in_range(0, 256)] = 8
    inpainting_mask_invert: Flag = False
    initial_noise_multiplier: Annotated[float, in_range(0, 1.5)] = 0.5
    # The Python SDK's InpaintingRequest defaults clip_skip to 0; A1111 reads 0 as 1 (the last layer).
    clip_skip: Annotated[int, BeforeValidator(_zero_is_one), in_range(1, 12)] = 1


def _zero_is_one(value: Any) -> Any:
    return 1 if value == 0 and not isinstance(value, bool) else value


def inpainting_size(width: int, height: int) -> tuple[int, int]:
    """Inpainting's processing size: the image's size rounded down to a multiple of 8 (the VAE's factor)."""
    return width // 8 * 8, height // 8 * 8


def _check_scale_factor(value: float) -> float:
    if not 1 < value <= 4:
        raise PydanticCustomError("out_of_range", "must be greater than 1 and at most 4 (got {v})", {"v": value})
    return value


def extras_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's Extras destination for ``scale``: each side times ``scale``, floored to a multiple of 8 (what an
    upscale task returns; ``engine.upscalers`` runs to it)."""
    return int(width * scale // 8 * 8), int(height * scale // 8 * 8)


class UpscaleRequest(Lenient):
    """``POST /v3/async/upscale``: one image through an upscaler model (``models/upscaler/``), A1111's Extras
    semantics. No diffusion: no seed, one image. ``scale_factor`` accepts numeric strings ("2", as Novita's JS
    example sends it)."""

    task_type: SkipJsonSchema[Literal[TaskType.UPSCALE]] = TaskType.UPSCALE
    model_name: ModelName
    image_base64: Base64
    scale_factor: Annotated[float, Checked(_check_scale_factor, exclusiveMinimum=1, maximum=4)]

    @property
    def seed(self) -> int:
        """What the store records as the task's seed: an upscale has none."""
        return 0

    @property
    def image_num(self) -> int:
        return 1


def _task_type_of(value: Any) -> str:
    if isinstance(value, dict):
        # Rows stored before the contract had a task type were all img2img.
        return str(value.get("task_type") or TaskType.IMG_TO_IMG)
    return str(getattr(value, "task_type", TaskType.IMG_TO_IMG))


# Any endpoint's request (annotations); a new endpoint adds its model here and its tag to ``_TAGGED``.
TaskRequest = Img2ImgRequest | Txt2ImgRequest | InpaintingRequest | UpscaleRequest
_TAGGED = Annotated[
    Annotated[Img2ImgRequest, Tag(TaskType.IMG_TO_IMG)]
    | Annotated[Txt2ImgRequest, Tag(TaskType.TXT_TO_IMG)]
    | Annotated[InpaintingRequest, Tag(TaskType.INPAINTING)]
    | Annotated[UpscaleRequest, Tag(TaskType.UPSCALE)],
    Discriminator(_task_type_of),
]
_REQUEST = TypeAdapter[TaskRequest](_TAGGED)


def load_request(data: Any) -> TaskRequest:
    """A stored request (``dump_request``'s output, or an older row without ``task_type``) as its typed model.

    Ranges are not checked again (``fields.STORED``). Raises ``pydantic.ValidationError`` (a ``ValueError``) for
    data no endpoint accepts."""
    return _REQUEST.validate_python(data, context={STORED: True})


def dump_request(request: TaskRequest) -> dict[str, Any]:
    """The JSON-ready form the store keeps (``load_request`` reads it back to an equal model)."""
    out: dict[str, Any] = request.model_dump(mode="json")
    return out


# --- extra ---------------------------------------------------------------------------------------------------------


def _check_image_type(value: str) -> str:
    key = value.strip().lower()
    key = "jpeg" if key == "jpg" else key
    if key not in IMAGE_TYPES:
        raise PydanticCustomError("bad_image_type", "must be one of png, webp, jpeg (got '{v}')", {"v": value})
    return key


def _check_webhook_url(value: str) -> str:
    if not value.lower().startswith(("http://", "https://")) or len(value) > 2048:
        raise PydanticCustomError("bad_url", "must be an http(s) URL of at most 2048 characters")
    return value


def _check_test_status(value: str) -> str:
    if value not in TASK_STATUSES:
        raise PydanticCustomError("bad_status", "must be TASK_STATUS_SUCCEED or TASK_STATUS_FAILED")
    return value


class TestModeIn(Lenient):
    __test__ = False  # not a pytest class

    enabled: bool = False
    return_task_status: Annotated[str, Checked(_check_test_status, enum=list(TASK_STATUSES))] = "TASK_STATUS_SUCCEED"


class WebhookIn(Lenient):
    url: Annotated[str, Checked(_check_webhook_url, format="uri", maxLength=2048)]
    test_mode: TestModeIn | None = None


class AwsS3In(Lenient):
    region: Annotated[str, length(1, 64)]
    bucket: Annotated[str, length(1, 255)]
    path: Annotated[str, length(0, 1024)]
    save_to_path_directly: bool = False


class CustomStorageIn(Lenient):
    aws_s3: AwsS3In | None = None


class EnterprisePlanIn(Lenient):
    enabled: bool = False


class TaskExtra(Lenient):
    """The body's ``extra``. ``base_url`` is not the client's: the API sets it to the URL the task was submitted on
    (stored as ``_base_url``, as rows before the contract have it)."""

    model_config = ConfigDict(populate_by_name=True)

    response_image_type: Annotated[str, Checked(_check_image_type, enum=[*IMAGE_TYPES, "jpg"])] = "png"
    enable_nsfw_detection: bool = False
    nsfw_detection_level: Annotated[int, in_range(0, 2)] = 0
    webhook: WebhookIn | None = None
    custom_storage: CustomStorageIn | None = None
    enterprise_plan: EnterprisePlanIn | None = None
    base_url: SkipJsonSchema[str] = Field(default="", alias="_base_url", exclude=True)

    @property
    def webhook_url(self) -> str | None:
        return self.webhook.url if self.webhook is not None else None

    @property
    def custom_s3(self) -> AwsS3In | None:
        return self.custom_storage.aws_s3 if self.custom_storage is not None else None


def load_extra(data: Any) -> TaskExtra:
    """A stored ``extra`` (``dump_extra``'s output, or an older row's dict) as ``TaskExtra``."""
    return TaskExtra.model_validate(data or {}, context={STORED: True})


def dump_extra(extra: TaskExtra) -> dict[str, Any]:
    out: dict[str, Any] = extra.model_dump(mode="json", exclude_none=True)
    out["_base_url"] = extra.base_url
    return out
