"""The ``POST /v3/async/img2img`` body as pydantic models, with Novita's ranges and defaults.

Lenient where the official SDKs need it: explicit ``null`` means "use the default" for every optional field
(the Python SDK sends ``"steps": null``), unknown keys are ignored, ``request.extra`` is ignored, ``extra`` may be
absent / ``null`` / ``{}``, sampler names tolerate case and spacing, ``jpg`` means ``jpeg``. Strict where a
mistake would silently change the result: out-of-range numbers, unknown samplers and preprocessors, malformed
bools are rejected with a message naming the field (see ``validation_error_to_api``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from underpaint.vocabulary import (
    PREPROCESSOR_NAMES,
    SAMPLER_NAMES,
    PreprocessorName,
    SamplerName,
    normalize_preprocessor_name,
    normalize_sampler_name,
)
from underpaint.wire.errors import ApiError, invalid_image_size, invalid_request

IMAGE_TYPES = ("png", "webp", "jpeg")
TASK_STATUSES = ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED")
MAX_SEED = 2**32 - 1


class Checked:
    """Field metadata: ``check`` runs after the type's own validation (its ``PydanticCustomError`` becomes the
    client's message), and ``schema`` holds the JSON-schema keywords that say the same in ``/openapi.json``."""

    def __init__(self, check: Callable[[Any], Any], **schema: Any) -> None:
        self.check = check
        self.schema = schema

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        out = handler(schema)
        out.update(self.schema)
        return out


def in_range(lo: float, hi: float) -> Checked:
    return Checked(_between(lo, hi), minimum=lo, maximum=hi)


def length(lo: int, hi: int) -> Checked:
    return Checked(_length(lo, hi), minLength=lo, maxLength=hi)


def at_most(n: int) -> Checked:
    return Checked(_at_most(n), maxItems=n)


def _between(lo: float, hi: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise PydanticCustomError("finite_number", "must be a finite number")
        if not lo <= value <= hi:
            raise PydanticCustomError("out_of_range", "must be between {lo} and {hi}", {"lo": _fmt(lo), "hi": _fmt(hi)})
        return value

    return check


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _length(lo: int, hi: int) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not lo <= len(value) <= hi:
            raise PydanticCustomError(
                "bad_length",
                "length must be between {lo} and {hi} characters (got {n})",
                {"lo": lo, "hi": hi, "n": len(value)},
            )
        return value

    return check


def _at_most(n: int) -> Callable[[list[Any]], list[Any]]:
    def check(value: list[Any]) -> list[Any]:
        if len(value) > n:
            raise PydanticCustomError(
                "too_many", "at most {n} items are allowed (got {got})", {"n": n, "got": len(value)}
            )
        return value

    return check


def _check_sampler(value: str) -> SamplerName:
    found = normalize_sampler_name(value)
    if found is None:
        raise PydanticCustomError(
            "unknown_sampler", "unknown sampler '{name}'; expected one of: {names}",
            {"name": value, "names": ", ".join(SAMPLER_NAMES)},
        )  # fmt: skip
    return found


def _check_preprocessor(value: str | None) -> PreprocessorName | None:
    try:
        return normalize_preprocessor_name(value)
    except ValueError:
        raise PydanticCustomError(
            "unknown_preprocessor", "unknown preprocessor '{name}'; this server runs: none, {names}",
            {"name": value, "names": ", ".join(sorted(PREPROCESSOR_NAMES))},
        ) from None  # fmt: skip


def _check_image_type(value: str) -> str:
    key = value.strip().lower()
    key = "jpeg" if key == "jpg" else key
    if key not in IMAGE_TYPES:
        raise PydanticCustomError("bad_image_type", "must be one of png, webp, jpeg (got '{v}')", {"v": value})
    return key


def _non_empty_base64(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_image", "must be a non-empty base64-encoded image")
    return value  # decoded and size-checked by api.images


def _check_webhook_url(value: str) -> str:
    if not value.lower().startswith(("http://", "https://")) or len(value) > 2048:
        raise PydanticCustomError("bad_url", "must be an http(s) URL of at most 2048 characters")
    return value


def _check_test_status(value: str) -> str:
    if value not in TASK_STATUSES:
        raise PydanticCustomError("bad_status", "must be TASK_STATUS_SUCCEED or TASK_STATUS_FAILED")
    return value


ModelName = Annotated[str, length(1, 512)]
Unit = Annotated[float, in_range(0, 1)]
Base64 = Annotated[str, Checked(_non_empty_base64, minLength=1, contentEncoding="base64")]


class _Lenient(BaseModel):
    """Ignore unknown keys; treat explicit nulls as absent so that defaults apply."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class LoraIn(_Lenient):
    model_name: ModelName
    strength: Unit = 1.0


class EmbeddingIn(_Lenient):
    model_name: ModelName


class ControlNetUnitIn(_Lenient):
    model_name: ModelName
    image_base64: Base64
    strength: Unit = 1.0
    preprocessor: Annotated[
        PreprocessorName | None, Checked(_check_preprocessor, enum=[None, "none", *sorted(PREPROCESSOR_NAMES)])
    ] = None
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


class ControlNetIn(_Lenient):
    units: Annotated[list[ControlNetUnitIn], at_most(5)]

    @model_validator(mode="after")
    def _not_empty(self) -> ControlNetIn:
        if not self.units:
            raise PydanticCustomError("no_units", "controlnet.units must contain at least one unit")
        return self


class IPAdapterIn(_Lenient):
    model_name: ModelName
    image_base64: Base64
    strength: Unit = 1.0


class Img2ImgRequest(_Lenient):
    model_name: ModelName
    image_base64: Base64
    prompt: Annotated[str, length(1, 1024)]
    negative_prompt: Annotated[str, length(0, 1024)] = ""
    width: Annotated[int, in_range(128, 2048)] = 512
    height: Annotated[int, in_range(128, 2048)] = 512
    image_num: Annotated[int, in_range(1, 8)] = 1
    steps: Annotated[int, in_range(1, 100)] = 20
    guidance_scale: Annotated[float, in_range(1, 30)] = 7.5
    sampler_name: Annotated[SamplerName, Checked(_check_sampler, enum=list(SAMPLER_NAMES))] = SamplerName("Euler a")
    seed: Annotated[int, in_range(-1, MAX_SEED)] = -1
    sd_vae: ModelName | None = None
    clip_skip: Annotated[int, in_range(1, 12)] = 1
    strength: Unit = 0.5
    loras: Annotated[list[LoraIn], at_most(5)] = Field(default_factory=list)
    embeddings: Annotated[list[EmbeddingIn], at_most(5)] = Field(default_factory=list)
    controlnet: ControlNetIn | None = None
    ip_adapters: Annotated[list[IPAdapterIn], at_most(1)] = Field(default_factory=list)


class TestModeIn(_Lenient):
    enabled: bool = False
    return_task_status: Annotated[str, Checked(_check_test_status, enum=list(TASK_STATUSES))] = "TASK_STATUS_SUCCEED"


class WebhookIn(_Lenient):
    url: Annotated[str, Checked(_check_webhook_url, format="uri", maxLength=2048)]
    test_mode: TestModeIn | None = None


class AwsS3In(_Lenient):
    region: Annotated[str, length(1, 64)]
    bucket: Annotated[str, length(1, 255)]
    path: Annotated[str, length(0, 1024)]
    save_to_path_directly: bool = False


class CustomStorageIn(_Lenient):
    aws_s3: AwsS3In | None = None


class EnterprisePlanIn(_Lenient):
    enabled: bool = False


class ExtraIn(_Lenient):
    response_image_type: Annotated[str, Checked(_check_image_type, enum=[*IMAGE_TYPES, "jpg"])] = "png"
    enable_nsfw_detection: bool = False
    nsfw_detection_level: Annotated[int, in_range(0, 2)] = 0
    webhook: WebhookIn | None = None
    custom_storage: CustomStorageIn | None = None
    enterprise_plan: EnterprisePlanIn | None = None


class Img2ImgBody(_Lenient):
    extra: ExtraIn = Field(default_factory=ExtraIn)
    request: Img2ImgRequest


# ---------------------------------------------------------------------------------------------------------------
# Validation errors → Novita errors

_TYPE_MESSAGES = {
    "missing": "is required",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
    "bool_type": "must be a boolean (true or false)",
    "bool_parsing": "must be a boolean (true or false)",
    "string_type": "must be a string",
    "list_type": "must be an array",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "dict_type": "must be an object",
}

_SIZE_FIELDS = {("request", "width"), ("request", "height")}


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("request", "loras", 0, "strength")`` → ``request.loras[0].strength``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_error_to_api(errors: list[dict[str, Any]]) -> ApiError:
    """The first pydantic error as a Novita 400 naming the field, e.g. ``request.width: must be between ...``."""
    if not errors:
        return invalid_request("invalid request body")
    err = errors[0]
    loc = tuple(p for p in err.get("loc", ()) if p not in ("body",))
    kind = err.get("type", "")
    message = _TYPE_MESSAGES.get(kind) or _lower_first(str(err.get("msg", "is invalid")))
    field = field_path(loc)
    text = f"{field}: {message}"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    if loc in _SIZE_FIELDS and kind == "out_of_range":
        return invalid_image_size(text, field=field)
    return invalid_request(text, field=field)


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:]


T = TypeVar("T", bound=BaseModel)


def parse_body(model: type[T], data: Any) -> T:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error_to_api([dict(e) for e in exc.errors(include_url=False, include_input=False)]) from None
