"""One settings object, built once and passed down to every layer.

Sources, later wins: defaults < optional TOML/JSON config file (``--config`` or ``UNDERPAINT_CONFIG``) <
environment (``UNDERPAINT_*``) < CLI flags. ``load_settings`` layers them (through ``pydantic-settings``);
``Settings(...)`` alone is the defaults plus the given values. Every value is checked on the way in: a wrong
type, an unknown choice, an out-of-range number or an unknown key in the file raises ``SettingsError`` with one
line naming the setting and what it accepts. API keys and secrets are never logged and never appear in ``repr``.

Lists (``api_keys``, ``admin_api_keys``, ``checkpoint_queues``, ``webhook_allow_hosts``,
``model_pull_allow_hosts``) are comma-separated in the environment; ``key_policies`` and ``default_key_policy``
are JSON there, tables in a TOML file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as _SourceError

ENV_PREFIX = "UNDERPAINT_"


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming the setting and what is allowed."""


class KeyPolicy(BaseModel):
    """Per-API-key limits. ``None`` means unlimited (the self-hosted default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images_per_minute: Annotated[int, Field(ge=1)] | None = None
    max_queued_tasks: Annotated[int, Field(ge=1)] | None = None
    # Keys granted a dedicated pool: ``enterprise_plan.enabled`` routes their tasks to this lane.
    dedicated_lane: str | None = None
    # Secret used to sign webhook deliveries (Standard Webhooks): base64 of the key bytes, optionally prefixed
    # "whsec_" (anything else stops the server at startup). Derived from the key when unset.
    webhook_secret: str | None = Field(default=None, repr=False)


def _comma_list(value: Any) -> Any:
    """``"a, b,,c"`` (environment) → ``("a", "b", "c")``; a list (config file) passes through."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return value


def _json_text(value: Any) -> Any:
    """A JSON object given as text (environment); malformed JSON is a one-line error, not a traceback."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ValueError(f"is not valid JSON ({exc})") from None
    return value


def _device(value: Any) -> Any:
    if isinstance(value, str) and not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value.strip().lower()):
        raise ValueError("is not a device; use auto, cpu, cuda, cuda:N or mps")
    return value.strip().lower() if isinstance(value, str) else value


CommaList = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_list)]
Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Device = Annotated[str, BeforeValidator(_device)]
KeyPolicies = Annotated[dict[str, KeyPolicy], NoDecode, BeforeValidator(_json_text)]
DefaultKeyPolicy = Annotated[KeyPolicy | None, NoDecode, BeforeValidator(_json_text)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", case_sensitive=False, validate_default=False
    )

    host: str = "127.0.0.1"
    port: Port = 8188
    data_dir: Path = Path("./data")
    models_dir: Path = Path("./models")
    # Absolute base URL used in image URLs; default derives from the incoming request.
    public_base_url: str | None = None
    api_keys: CommaList = Field(default=(), repr=False)
    # Keys that may pull models into models_dir over the API (POST /v3/model/pull); none by default.
    admin_api_keys: CommaList = Field(default=(), repr=False)
    key_policies: KeyPolicies = Field(default_factory=dict, repr=False)
    # Limits for keys without an entry in key_policies; None = unlimited.
    default_key_policy: DefaultKeyPolicy = None
    # Task store: SQLAlchemy URL; default is SQLite under data_dir.
    database_url: str | None = Field(default=None, repr=False)
    # "local" (in-process worker polling the store) or "celery".
    queue_backend: Literal["local", "celery"] = "local"
    broker_url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    # Redis broker: an unacknowledged message goes back to its queue after this many seconds (the store's lease,
    # not this, decides when a crashed task is retried; this only bounds how long a lost message is invisible).
    broker_visibility_timeout: Positive = 3600
    # Checkpoints (sd_name) that get a queue of their own, "<base>.<stem>", so their workers keep them loaded.
    checkpoint_queues: CommaList = ()
    # txt2img's SDXL refiner when a request names none (``refiner.model_name``): a checkpoint name; empty = the
    # first checkpoint whose name contains "refiner".
    refiner_checkpoint: str = ""
    # "text" or "json" (one JSON object per line, with the task id when one is being handled).
    log_format: Literal["text", "json"] = "text"
    run_worker: bool = True
    # Embedded mode: run the worker in a child process (no GIL shared with the HTTP server) or in a thread.
    worker_process: bool = True
    # Where that worker process serves its own Prometheus metrics (generation seconds, model loads); off if None.
    worker_metrics_port: Port | None = None
    image_url_ttl: Positive = 3600
    retention_seconds: NonNegative = 7 * 24 * 3600
    # A task whose worker vanished is retried after this many seconds without a heartbeat.
    lease_seconds: Positive = 120
    max_attempts: Positive = 3
    # Celery: an idle worker claims, straight from the store, tasks of its queues that have been QUEUED this long
    # (their broker message was lost: a broker restart without persistence, a failed publish). Such a task waits
    # about twice this at most once a worker is free.
    queue_poll_seconds: PositiveFloat = 10.0
    # How often a worker reads the cancel flag of the task it runs (the sampler itself checks a local event).
    cancel_poll_seconds: PositiveFloat = 0.5
    # Engine
    device: Device = "auto"
    torch_threads: Positive | None = None
    checkpoint_cache_bytes: NonNegative = 12 * 1024**3
    # RAM tier: recently used checkpoints kept as CPU state dicts (file dtype; pinned on CUDA), so that switching
    # back is a copy, not a file read; the worker also reads the next queued task's checkpoint into it (0 = off).
    checkpoint_ram_cache_bytes: NonNegative = 8 * 1024**3
    # Batching: a worker runs up to max_batch compatible queued tasks in one sampler call (1 = off). After taking
    # a task it waits up to batch_window_ms for mates (None: 0 on CPU, 20 on CUDA).
    max_batch: Positive = 4
    batch_window_ms: NonNegative | None = None
    # Model-aware claiming: prefer tasks for the loaded checkpoint + LoRA set unless a task waited longer than this
    # (0 = plain priority/age order).
    max_affinity_wait_s: float = 30.0
    # Weights' precision: auto = float16 on CUDA, float32 on CPU. bfloat16 also runs on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The VAE's: auto = the weights' dtype, but float32 for a VAE that asks for an upcast (SDXL's) under float16.
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # torch.compile the UNet (CUDA: inductor); the first task of each image size pays the compile (see README).
    compile: bool = False
    # channels_last memory format for the UNet and VAE (CUDA only; ignored on CPU).
    channels_last: bool = False
    # URL signing secret for image downloads; generated and persisted under data_dir when unset.
    url_secret: str | None = Field(default=None, repr=False)
    # Webhooks
    webhook_allow_hosts: CommaList = ()
    # Private hosts (loopback, LAN) POST /v3/model/pull may download from; public hosts are always allowed.
    model_pull_allow_hosts: CommaList = ()
    # A model pull whose node stops is resumed by another node (or the restarted one) this long after the node's
    # last progress write (it writes every second while it downloads).
    model_pull_lease_seconds: PositiveFloat = 30.0
    webhook_timeout: PositiveFloat = 5.0
    webhook_max_retries: NonNegative = 5
    # Storage: "local" or "s3"
    storage_backend: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = "underpaint"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # A failed upload to unreachable storage (S3 down, 5xx) is retried with backoff for this long per outage
    # before the task fails; the worker holds its tasks (and their leases) meanwhile. 0 = fail at once.
    storage_retry_seconds: NonNegative = 300
    # Where a worker keeps encoded images until they are uploaded (through such an outage too); default
    # data_dir/spool. Each worker process has a folder of its own there; a dead one's is cleared at the next start.
    spool_dir: Path | None = None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise SettingsError(_one_line(exc)) from None
        except _SourceError as exc:
            raise SettingsError(str(exc).splitlines()[0]) from None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only ``load_settings`` reads the environment and the file: ``Settings(...)`` stays a plain constructor.
        return (init_settings, _LayerEnvSource(settings_cls), _LayerFileSource(settings_cls))

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'underpaint.db').resolve()}"

    @property
    def resolved_spool_dir(self) -> Path:
        return self.spool_dir if self.spool_dir is not None else self.data_dir / "spool"

    def with_overrides(self, **kwargs: Any) -> Settings:
        """A copy with the given values (``None`` = keep), checked like any other source."""
        clean = {k: v for k, v in kwargs.items() if v is not None}
        if not clean:
            return self
        current = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self)(**{**current, **clean})

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with every secret masked (``underpaint config``)."""
        data = self.model_dump(mode="json")
        data["api_keys"] = [_mask(k) for k in self.api_keys]
        data["admin_api_keys"] = [_mask(k) for k in self.admin_api_keys]
        data["key_policies"] = {_mask(key): _masked_policy(policy) for key, policy in sorted(self.key_policies.items())}
        if self.default_key_policy is not None:
            data["default_key_policy"] = _masked_policy(self.default_key_policy)
        for name in ("url_secret",):
            if data[name] is not None:
                data[name] = "********"
        for name in ("database_url", "broker_url"):
            if data[name]:
                data[name] = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1********@", data[name])
        return data


def _mask(secret: str) -> str:
    return secret[:4] + "…" if len(secret) > 12 else "********"


def _masked_policy(policy: KeyPolicy) -> dict[str, Any]:
    data = policy.model_dump(mode="json")
    if data.get("webhook_secret"):
        data["webhook_secret"] = "********"
    return data


# --- layering ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layers:
    env: dict[str, str]
    file: dict[str, Any]
    file_name: str


_LAYERS: ContextVar[_Layers | None] = ContextVar("underpaint_settings_layers", default=None)


class _LayerEnvSource(EnvSettingsSource):
    """``UNDERPAINT_*`` variables of the environment ``load_settings`` was given (none outside it)."""

    def _load_env_vars(self) -> dict[str, str | None]:
        layers = _LAYERS.get()
        if layers is None:
            return {}
        return {k.lower(): v for k, v in layers.env.items() if k.upper().startswith(ENV_PREFIX)}


class _LayerFileSource(PydanticBaseSettingsSource):
    """The config file's values; an unknown key there is refused (by ``extra="forbid"``)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ returns the whole file at once

    def __call__(self) -> dict[str, Any]:
        layers = _LAYERS.get()
        return dict(layers.file) if layers is not None else {}


def _read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"config file {str(path)!r}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = tomllib.loads(raw.decode()) if str(path).endswith(".toml") else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "TOML" if str(path).endswith(".toml") else "JSON"
        raise SettingsError(f"config file {str(path)!r}: not valid {kind} ({exc})") from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {str(path)!r}: must hold a table/object of settings")
    return data


def load_settings(config_file: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults < config file < environment (``env``, default ``os.environ``). Raises ``SettingsError``."""
    env = dict(os.environ if env is None else env)
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    file_values = _read_file(path) if path else {}
    token = _LAYERS.set(_Layers(env=env, file=file_values, file_name=str(path or "")))
    try:
        return Settings()
    finally:
        _LAYERS.reset(token)


# --- one-line errors -----------------------------------------------------------------------------------------


def _one_line(exc: ValidationError) -> str:
    """The first problem of a validation error as ``setting <name>: <what is wrong>; <what is allowed>``."""
    problems = []
    for err in exc.errors(include_url=False):
        parts = [str(p) for p in err["loc"]]
        if parts[:1] == ["key_policies"] and len(parts) > 1:
            parts[1] = "<api key>"  # the key is a secret: never in an error line
        problems.append(f"setting {'.'.join(parts) or 'settings'}: {_describe(err, parts[0] if parts else '')}")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


_SECRET_INPUTS = ("api_keys", "key_policies", "default_key_policy", "url_secret", "database_url", "broker_url")
_PORTS = ("port", "worker_metrics_port")


def _describe(err: Any, name: str) -> str:
    kind = err["type"]
    given = err.get("input")
    shown = repr(given) if isinstance(given, str | int | float | bool) else type(given).__name__
    if name in _SECRET_INPUTS:
        shown = "the value"  # may hold API keys or passwords
    ctx = err.get("ctx") or {}
    if name in _PORTS and kind in ("greater_than_equal", "less_than_equal"):
        return f"{shown} is out of range; a port is 1 to 65535"
    if kind == "extra_forbidden":
        return "unknown setting; check its spelling (see `underpaint config` for every setting)"
    if kind == "literal_error":
        return f"{shown} is not allowed; use one of {ctx.get('expected', '')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        limit = next(iter(ctx.values()), "")
        return f"{shown} is out of range; it must be {bound} {limit}"
    if kind.startswith("bool"):
        return f"{shown} is not a boolean; use true/false (also 1/0, yes/no, on/off)"
    if kind.startswith("int"):
        return f"{shown} is not a whole number"
    if kind.startswith("float"):
        return f"{shown} is not a number"
    if kind == "value_error":
        return f"{shown} {str(err['msg']).removeprefix('Value error, ')}"
    return f"{shown}: {err['msg']}"
