"""``underpaint`` command line: serve, worker, models, pull, demo-models, webhook-secret, config.

Settings come from defaults < config file < ``UNDERPAINT_*`` environment < these flags; a bad value anywhere
stops the command with one line on stderr naming the setting (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from underpaint.config import Settings, SettingsError, load_settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML or JSON config file (env UNDERPAINT_CONFIG)")
    p.add_argument("--data-dir", type=Path, help="task database, images and secrets (default ./data)")
    p.add_argument("--models-dir", type=Path, help="models folder (default ./models)")
    p.add_argument("--database-url", help="SQLAlchemy URL of the task store (default SQLite in the data dir)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's own)")
    dtypes = ["auto", "float32", "float16", "bfloat16"]
    p.add_argument("--dtype", choices=dtypes, help="weights' precision (default auto: float16 on CUDA, float32 on CPU)")
    p.add_argument("--vae-dtype", choices=dtypes, help="the VAE's precision (default auto; SDXL's VAE upcasts)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the UNet (warm-up per size)")


def _settings(args: argparse.Namespace) -> Settings:
    base = load_settings(getattr(args, "config", None))
    return base.with_overrides(
        data_dir=getattr(args, "data_dir", None),
        models_dir=getattr(args, "models_dir", None),
        database_url=getattr(args, "database_url", None),
        device=getattr(args, "device", None),
        torch_threads=getattr(args, "torch_threads", None),
        dtype=getattr(args, "dtype", None),
        vae_dtype=getattr(args, "vae_dtype", None),
        compile=getattr(args, "compile", None),
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
        public_base_url=getattr(args, "public_base_url", None),
        queue_backend=getattr(args, "queue", None),
        broker_url=getattr(args, "broker_url", None),
        log_format=getattr(args, "log_format", None),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from underpaint.wiring import run_server

    settings: Settings = args.settings
    if args.no_worker:
        settings = settings.with_overrides(run_worker=False)
    if not settings.api_keys:
        print("warning: no API keys configured (UNDERPAINT_API_KEYS); every request will get 403", file=sys.stderr)
    run_server(settings)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from underpaint.wiring import run_celery_worker

    settings: Settings = args.settings
    try:
        return run_celery_worker(settings, args.queues, args.concurrency, args.metrics_port)
    except ValueError as exc:  # bad --queues, --concurrency, broker URL ...: a message, not a traceback
        print(f"underpaint worker: error: {exc}", file=sys.stderr)
        return 2


def cmd_models(args: argparse.Namespace) -> int:
    from underpaint.registry import ModelRegistry

    settings: Settings = args.settings
    registry = ModelRegistry(settings.models_dir)
    rows = [
        {
            "type": e.kind,
            "sd_name": e.sd_name,
            "sd_name_in_api": e.sd_name_in_api,
            "base_model": e.base_model,
            "size": e.size,
        }
        for e in registry.list(args.type)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['type']:<17} {r['base_model']:<9} {r['sd_name']}")
        if not rows:
            print(f"no models under {settings.models_dir} (try: underpaint demo-models {settings.models_dir})")
    return 0


class _ProgressBar:
    """One line on stderr, redrawn at most 10 times a second: percent, bytes and speed."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label, self.enabled = label, enabled
        self.start = self.drawn = time.monotonic()

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.drawn < 0.1 and done != total):
            return
        self.drawn = now
        speed = done / max(now - self.start, 1e-6) / 1e6
        share = f"{100 * done / total:5.1f}% of {total / 1e9:.2f} GB" if total else f"{done / 1e9:.2f} GB"
        width = 30
        filled = width * done // total if total else 0
        print(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {share} {speed:6.1f} MB/s",
            end="",
            file=sys.stderr,
        )

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    from underpaint.delivery.model_download import PullError, pull

    settings: Settings = args.settings
    bar = _ProgressBar(args.source, enabled=not args.quiet)
    try:
        result = pull(
            args.source,
            settings.models_dir,
            kind=args.type,
            name=args.name,
            sha256=args.sha256,
            on_progress=bar,
            overwrite=args.overwrite,
        )
    except PullError as exc:
        bar.close()
        print(f"underpaint pull: error: {exc}", file=sys.stderr)
        return 1
    bar.close()
    resumed = f", resumed at {result.resumed_from} bytes" if result.resumed_from else ""
    print(f"{result.path} ({result.kind}, {result.size} bytes, sha256 {result.sha256}{resumed})")
    return 0


def cmd_demo_models(args: argparse.Namespace) -> int:
    from underpaint.demo.models import write_all_demo_models

    written = write_all_demo_models(Path(args.dir))
    for name, path in written.items():
        print(f"{name}: {path}")
    print("These are tiny random-weight models: they exercise every code path but draw noise, not pictures.")
    return 0


def cmd_webhook_secret(args: argparse.Namespace) -> int:
    from underpaint.wiring import webhook_secret_for_key

    print(webhook_secret_for_key(args.settings, args.key))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """Print the effective settings (every source applied) with secrets masked."""
    settings: Settings = args.settings
    print(json.dumps(settings.masked(), indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # --help is plain text: the module docstring's reST literals (double backquotes) are for the docs only.
    parser = argparse.ArgumentParser(
        prog="underpaint",
        description=(__doc__ or "").replace("``", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the docstring's paragraphs as written
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="json: one object per line with the task id (env UNDERPAINT_LOG_FORMAT; default text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="HTTP API (+ in-process worker unless --no-worker)")
    _common(p)
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8188)")
    p.add_argument("--public-base-url", help="absolute base URL for image links (default: from the request)")
    p.add_argument("--no-worker", action="store_true", help="API node only (scale-out mode)")
    p.add_argument("--queue", help="local | celery")
    p.add_argument("--broker-url", help="Celery broker URL (redis://... or amqp://...)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="a GPU worker consuming Celery queues (scale-out mode)")
    _common(p)
    p.add_argument("--broker-url", help="Celery broker URL")
    p.add_argument("--queues", default="sd15,sdxl", help="comma-separated queues to consume")
    p.add_argument("--concurrency", type=int, default=1, help="generations at once, each with its own model cache")
    p.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus metrics on this port")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("models", help="list what the model registry sees")
    _common(p)
    p.add_argument(
        "--type", choices=["checkpoint", "lora", "vae", "textualinversion", "controlnet", "ipadapter", "annotator"]
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "pull",
        help="download a model into the models folder: URL, hf:OWNER/REPO/FILE[@REV] or civitai:VERSION_ID",
        description="Download with resume (run it again after an interruption), size and sha256 checks (given, "
        "or from Hugging Face's headers) and an atomic rename into models/<type>/.",
    )
    _common(p)
    p.add_argument("source", help="http(s) URL, hf:OWNER/REPO/PATH[@REVISION] or civitai:MODEL_VERSION_ID")
    p.add_argument("--type", choices=["checkpoint", "lora", "vae", "textualinversion", "controlnet", "ipadapter"])
    p.add_argument("--name", help="file name in the models folder (default: the server's or the URL's)")
    p.add_argument("--sha256", help="expected sha256 of the file (64 hex digits)")
    p.add_argument("--overwrite", action="store_true", help="replace a file of the same name")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("demo-models", help="write tiny random-weight models in the real formats into DIR")
    p.add_argument("dir")
    p.set_defaults(func=cmd_demo_models)

    p = sub.add_parser("webhook-secret", help="print the webhook signing secret of an API key")
    _common(p)
    p.add_argument("--key", required=True)
    p.set_defaults(func=cmd_webhook_secret)

    p = sub.add_parser("config", help="print the effective settings (file < env < flags), secrets masked")
    _common(p)
    p.add_argument("--host", help="bind address")
    p.add_argument("--port", type=int, help="port")
    p.add_argument("--public-base-url", help="absolute base URL for image links")
    p.add_argument("--queue", help="local | celery")
    p.add_argument("--broker-url", help="Celery broker URL")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.settings = _settings(args)
    except SettingsError as exc:
        print(f"underpaint {args.command}: error: {exc}", file=sys.stderr)
        return 2
    from underpaint.scale.json_logs import configure_logging

    configure_logging(args.log_level, args.settings.log_format)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
