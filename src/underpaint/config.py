"""One settings object, built once and passed down to every layer.

Sources, later wins: defaults < optional TOML/JSON config file < environment (``UNDERPAINT_*``) < CLI flags.
API keys are secrets: they are never logged and never appear in ``repr``.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class KeyPolicy:
    """Per-API-key limits. ``None`` means unlimited (the self-hosted default)."""

    images_per_minute: int | None = None
    max_queued_tasks: int | None = None
    # Keys granted a dedicated pool: ``enterprise_plan.enabled`` routes their tasks to this lane.
    dedicated_lane: str | None = None
    # Secret used to sign webhook deliveries (Standard Webhooks). Derived from the key when unset.
    webhook_secret: str | None = None


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8188
    data_dir: Path = Path("./data")
    models_dir: Path = Path("./models")
    # Absolute base URL used in image URLs; default derives from the incoming request.
    public_base_url: str | None = None
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    key_policies: dict[str, KeyPolicy] = field(default_factory=dict, repr=False)
    # Limits for keys without an entry in key_policies; None = unlimited.
    default_key_policy: KeyPolicy | None = None
    # Task store: SQLAlchemy URL; default is SQLite under data_dir.
    database_url: str | None = None
    # "local" (in-process worker polling the store) or "celery".
    queue_backend: str = "local"
    broker_url: str = "redis://127.0.0.1:6379/0"
    # Redis broker: an unacknowledged message goes back to its queue after this many seconds (the store's lease,
    # not this, decides when a crashed task is retried; this only bounds how long a lost message is invisible).
    broker_visibility_timeout: int = 3600
    # Checkpoints (sd_name) that get a queue of their own, "<base>.<stem>", so their workers keep them loaded.
    checkpoint_queues: tuple[str, ...] = ()
    # "text" or "json" (one JSON object per line, with the task id when one is being handled).
    log_format: str = "text"
    run_worker: bool = True
    # Embedded mode: run the worker in a child process (no GIL shared with the HTTP server) or in a thread.
    worker_process: bool = True
    # Where that worker process serves its own Prometheus metrics (generation seconds, model loads); off if None.
    worker_metrics_port: int | None = None
    image_url_ttl: int = 3600
    retention_seconds: int = 7 * 24 * 3600
    # A task whose worker vanished is retried after this many seconds without a heartbeat.
    lease_seconds: int = 120
    max_attempts: int = 3
    # Engine
    device: str = "auto"
    torch_threads: int | None = None
    checkpoint_cache_bytes: int = 12 * 1024**3
    # Weights' precision: auto = float16 on CUDA, float32 on CPU. bfloat16 also runs on CPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The VAE's: auto = the weights' dtype, but float32 for a VAE that asks for an upcast (SDXL's) under float16.
    vae_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # torch.compile the UNet (CUDA: inductor); the first task of each image size pays the compile (see README).
    compile: bool = False
    # channels_last memory format for the UNet and VAE (CUDA only; ignored on CPU).
    channels_last: bool = False
    # URL signing secret for image downloads; generated and persisted under data_dir when unset.
    url_secret: str | None = field(default=None, repr=False)
    # Webhooks
    webhook_allow_hosts: tuple[str, ...] = ()
    webhook_timeout: float = 5.0
    webhook_max_retries: int = 5
    # Storage: "local" or "s3"
    storage_backend: str = "local"
    s3_bucket: str | None = None
    s3_prefix: str = "underpaint"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'underpaint.db').resolve()}"

    def with_overrides(self, **kwargs: Any) -> Settings:
        clean = {k: v for k, v in kwargs.items() if v is not None}
        return replace(self, **_coerce(clean))


_ENV_PREFIX = "UNDERPAINT_"


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Convert strings from env/config files into the field types of ``Settings``."""
    types = {f.name: f.type for f in fields(Settings)}
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name not in types:
            raise ValueError(f"unknown setting {name!r}")
        t = str(types[name])
        if name == "key_policies" and isinstance(value, dict):
            value = {k: v if isinstance(v, KeyPolicy) else KeyPolicy(**v) for k, v in value.items()}
        elif name == "default_key_policy" and isinstance(value, str | dict):
            # From a config table, or JSON in UNDERPAINT_DEFAULT_KEY_POLICY.
            value = KeyPolicy(**(json.loads(value) if isinstance(value, str) else value))
        elif isinstance(value, str):
            if t.startswith("tuple"):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            elif t.startswith("int"):
                value = int(value)
            elif t.startswith("float"):
                value = float(value)
            elif t == "bool":
                value = value.strip().lower() in ("1", "true", "yes", "on")
            elif t == "Path":
                value = Path(value)
        elif isinstance(value, list):
            value = tuple(value)
        if t == "Path" and isinstance(value, str):
            value = Path(value)
        out[name] = value
    return out


def load_settings(config_file: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    values: dict[str, Any] = {}
    path = config_file or env.get(_ENV_PREFIX + "CONFIG")
    if path:
        raw = Path(path).read_bytes()
        data = tomllib.loads(raw.decode()) if str(path).endswith(".toml") else json.loads(raw)
        values.update(data)
    names = {f.name for f in fields(Settings)}
    for key, value in env.items():
        if key.startswith(_ENV_PREFIX):
            name = key[len(_ENV_PREFIX) :].lower()
            if name in names:
                values[name] = value
    return Settings(**_coerce(values))
