"""Field types of the task contract (``tasks.contract``): ranges, lengths and vocabularies as pydantic metadata.

Each check raises a ``PydanticCustomError`` whose message names what is wrong; the API turns the first one into
a Novita 400 naming the field (``api.schemas.validation_error_to_api``). Each also states the same rule as
JSON-schema keywords, so ``/openapi.json`` documents exactly what is enforced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, GetCoreSchemaHandler, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from underpaint.vocabulary import (
    PREPROCESSOR_NAMES,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    PreprocessorName,
    SamplerName,
    SchedulerName,
    normalize_preprocessor_name,
    normalize_sampler_name,
    normalize_scheduler_name,
)

MAX_SEED = 2**32 - 1


# Validation context of a request read back from the store (``tasks.contract.load_request``): it was checked
# when it was accepted, so the checks below (ranges, lengths, counts, names) are not run again. Types and
# structure still are; a task accepted under older limits (or written by a test at a tiny size) still runs.
STORED = "stored"


class Checked:
    """Field metadata: ``check`` runs after the type's own validation (its ``PydanticCustomError`` becomes the
    client's message), and ``schema`` holds the JSON-schema keywords that say the same in ``/openapi.json``.
    ``check`` is skipped for stored data (validation context ``{STORED: True}``)."""

    def __init__(self, check: Callable[[Any], Any], **schema: Any) -> None:
        self.check = check
        self.schema = schema

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        check = self.check

        def run(value: Any, info: core_schema.ValidationInfo) -> Any:
            if isinstance(info.context, dict) and info.context.get(STORED):
                return value
            return check(value)

        return core_schema.with_info_after_validator_function(run, handler(source))

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


def _check_scheduler(value: str | None) -> SchedulerName | None:
    if value is None:
        return None
    found = normalize_scheduler_name(value)
    if found is None:
        raise PydanticCustomError(
            "unknown_scheduler", "unknown schedule type '{name}'; expected one of: {names}",
            {"name": value, "names": ", ".join(SCHEDULER_NAMES)},
        )  # fmt: skip
    return found


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


def _non_empty_base64(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_image", "must be a non-empty base64-encoded image")
    return value  # decoded and size-checked by wire.images (at submit, and again by the worker)


ModelName = Annotated[str, length(1, 512)]
Unit = Annotated[float, in_range(0, 1)]
Base64 = Annotated[str, Checked(_non_empty_base64, minLength=1, contentEncoding="base64")]
Sampler = Annotated[SamplerName, Checked(_check_sampler, enum=list(SAMPLER_NAMES))]
Scheduler = Annotated[SchedulerName | None, Checked(_check_scheduler, enum=[None, *SCHEDULER_NAMES])]
Preprocessor = Annotated[
    PreprocessorName | None, Checked(_check_preprocessor, enum=[None, "none", *sorted(PREPROCESSOR_NAMES)])
]
Seed = Annotated[int, in_range(-1, MAX_SEED)]


class Lenient(BaseModel):
    """Ignore unknown keys; treat explicit nulls as absent so that defaults apply (the Python SDK sends
    ``"steps": null``)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data
