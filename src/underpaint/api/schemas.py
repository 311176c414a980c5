"""The submit bodies (``POST /v3/async/img2img``, ``/v3/async/txt2img``): ``{extra, request}`` over the typed task contract, and pydantic errors as
Novita 400s.

Lenient where the official SDKs need it: explicit ``null`` means "use the default" for every optional field
(the Python SDK sends ``"steps": null``), unknown keys are ignored, ``request.extra`` is ignored, ``extra`` may be
absent / ``null`` / ``{}``, sampler names tolerate case and spacing, ``jpg`` means ``jpeg``. Strict where a
mistake would silently change the result: out-of-range numbers, unknown samplers and preprocessors, malformed
bools are rejected with a message naming the field (see ``validation_error_to_api``). The request models
themselves are the task contract's (``tasks/contract.py``): what the API validates is what the store keeps.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from underpaint.tasks.contract import Img2ImgRequest, InpaintingRequest, TaskExtra, Txt2ImgRequest, UpscaleRequest
from underpaint.tasks.fields import Lenient
from underpaint.wire.errors import ApiError, invalid_image_size, invalid_request


class Img2ImgBody(Lenient):
    extra: TaskExtra = Field(default_factory=TaskExtra)
    request: Img2ImgRequest


class Txt2ImgBody(Lenient):
    extra: TaskExtra = Field(default_factory=TaskExtra)
    request: Txt2ImgRequest


class InpaintingBody(Lenient):
    extra: TaskExtra = Field(default_factory=TaskExtra)
    request: InpaintingRequest


class UpscaleBody(Lenient):
    extra: TaskExtra = Field(default_factory=TaskExtra)
    request: UpscaleRequest


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
