"""Settings: the layering (defaults < file < environment < flags), one-line errors for every kind of bad value,
and ``underpaint config`` with secrets masked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from underpaint.cli import main
from underpaint.config import KeyPolicy, Settings, SettingsError, load_settings

SRC = Path(__file__).resolve().parents[1] / "src"

# (environment, the one line it must produce). Each names the setting and what it accepts.
BAD_ENV: list[tuple[dict[str, str], str]] = [
    ({"UNDERPAINT_QUEUE_BACKEND": "celry"}, "setting queue_backend: 'celry' is not allowed; use one of 'local' or 'celery'"),
    ({"UNDERPAINT_LOG_FORMAT": "xml"}, "setting log_format: 'xml' is not allowed; use one of 'text' or 'json'"),
    ({"UNDERPAINT_STORAGE_BACKEND": "gcs"}, "setting storage_backend: 'gcs' is not allowed; use one of 'local' or 's3'"),
    ({"UNDERPAINT_DEVICE": "gpu"}, "setting device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ({"UNDERPAINT_DEVICE": "cuda:x"}, "setting device: 'cuda:x' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    ({"UNDERPAINT_PORT": "-5"}, "setting port: '-5' is out of range; a port is 1 to 65535"),
    ({"UNDERPAINT_PORT": "70000"}, "setting port: '70000' is out of range; a port is 1 to 65535"),
    ({"UNDERPAINT_PORT": "http"}, "setting port: 'http' is not a whole number"),
    ({"UNDERPAINT_LEASE_SECONDS": "0"}, "setting lease_seconds: '0' is out of range; it must be >= 1"),
    ({"UNDERPAINT_WEBHOOK_TIMEOUT": "soon"}, "setting webhook_timeout: 'soon' is not a number"),
    ({"UNDERPAINT_WEBHOOK_TIMEOUT": "0"}, "setting webhook_timeout: '0' is out of range; it must be > 0.0"),
    ({"UNDERPAINT_RUN_WORKER": "flase"}, "setting run_worker: 'flase' is not a boolean; use true/false (also 1/0, yes/no, on/off)"),
    (
        {"UNDERPAINT_KEY_POLICIES": '{"sk-live-123": {"images_per_minute": 10'},
        "setting key_policies: the value is not valid JSON (Expecting ',' delimiter: line 1 column 41 (char 40))",
    ),
    (
        {"UNDERPAINT_KEY_POLICIES": '{"sk-live-123": {"images_per_minit": 10}}'},
        "setting key_policies.<api key>.images_per_minit: unknown setting; check its spelling "
        "(see `underpaint config` for every setting)",
    ),
    (
        {"UNDERPAINT_KEY_POLICIES": '{"sk-live-123": {"images_per_minute": 0}}'},
        "setting key_policies.<api key>.images_per_minute: the value is out of range; it must be >= 1",
    ),
    ({"UNDERPAINT_KEY_POLICIES": '["sk-live-123"]'}, "setting key_policies: the value: Input should be a valid dictionary"),
    ({"UNDERPAINT_DEFAULT_KEY_POLICY": "{"}, "setting default_key_policy: the value is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("env", "line"), BAD_ENV, ids=[next(iter(e)) + "=" + next(iter(e.values())) for e, _ in BAD_ENV]
)
def test_bad_environment_value_is_one_line(env: dict[str, str], line: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings(env=env)
    assert str(err.value) == line
    assert "\n" not in str(err.value)
    assert "sk-live-123" not in str(err.value)  # API keys never appear in errors


BAD_FILES: list[tuple[str, str, str]] = [
    ("settings.toml", 'queue_backend = "local"\nporrt = 9000\n', "setting porrt: unknown setting; check its spelling (see `underpaint config` for every setting)"),
    ("settings.toml", "port = 9000.5\n", "setting port: 9000.5 is not a whole number"),
    ("settings.toml", 'run_worker = "flase"\n', "setting run_worker: 'flase' is not a boolean; use true/false (also 1/0, yes/no, on/off)"),
    ("settings.toml", "[key_policies.k1]\ndedicated_lane = 5\n", "setting key_policies.<api key>.dedicated_lane: the value: Input should be a valid string"),
    ("settings.json", '{"retention_seconds": -1}', "setting retention_seconds: -1 is out of range; it must be >= 0"),
    ("settings.json", '{"api_keys": "a,b", "worker_metrics_port": 0}', "setting worker_metrics_port: 0 is out of range; a port is 1 to 65535"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "line"), BAD_FILES)
def test_bad_config_file_is_one_line(tmp_path: Path, name: str, text: str, line: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SettingsError) as err:
        load_settings(path, env={})
    assert str(err.value) == line


def test_unreadable_or_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^config file '.*missing.toml': cannot be read"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(SettingsError, match=r"^config file '.*broken.toml': not valid TOML"):
        load_settings(broken, env={})


def test_layers_defaults_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_text(
        'port = 9000\nhost = "0.0.0.0"\napi_keys = ["a", "b"]\nlog_format = "json"\n'
        "[key_policies.a]\nimages_per_minute = 10\n"
    )
    env = {
        "UNDERPAINT_CONFIG": str(path),
        "UNDERPAINT_PORT": "9100",
        "UNDERPAINT_RUN_WORKER": "off",
        "UNDERPAINT_CHECKPOINT_QUEUES": "x.safetensors, y.safetensors",
        "UNDERPAINT_DEFAULT_KEY_POLICY": '{"max_queued_tasks": 4}',
        "UNDERPAINT_NOT_A_SETTING": "ignored",  # other tools' UNDERPAINT_* variables are not ours to refuse
    }
    settings = load_settings(env=env)
    assert (settings.host, settings.port, settings.run_worker) == ("0.0.0.0", 9100, False)  # env beats file
    assert settings.api_keys == ("a", "b")
    assert settings.log_format == "json"
    assert settings.key_policies == {"a": KeyPolicy(images_per_minute=10)}
    assert settings.default_key_policy == KeyPolicy(max_queued_tasks=4)
    assert settings.checkpoint_queues == ("x.safetensors", "y.safetensors")
    assert settings.lease_seconds == 120  # default
    flagged = settings.with_overrides(port=9200, host=None)  # flags beat env; None = flag not given
    assert (flagged.port, flagged.host) == (9200, "0.0.0.0")
    with pytest.raises(SettingsError, match=r"^setting port: 0 is out of range"):
        settings.with_overrides(port=0)


def test_settings_constructor_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Settings(...)`` is the defaults plus its arguments; only ``load_settings`` reads the environment."""
    monkeypatch.setenv("UNDERPAINT_PORT", "9999")
    assert Settings().port == 8188
    assert load_settings().port == 9999


def test_settings_are_frozen_and_secrets_stay_out_of_repr() -> None:
    settings = Settings(api_keys=("sk-secret-1",), url_secret="hush", key_policies={"sk-secret-1": KeyPolicy()})
    with pytest.raises(ValidationError, match="frozen"):
        settings.port = 1
    assert "sk-secret-1" not in repr(settings)
    assert "hush" not in repr(settings)


def test_cli_prints_effective_settings_with_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("UNDERPAINT_API_KEYS", "sk-live-0123456789abcdef,short")
    monkeypatch.setenv("UNDERPAINT_URL_SECRET", "url-signing-secret")
    monkeypatch.setenv("UNDERPAINT_DATABASE_URL", "postgresql+psycopg://app:pg-password@db:5432/underpaint")
    monkeypatch.setenv(
        "UNDERPAINT_KEY_POLICIES",
        '{"sk-live-0123456789abcdef": {"webhook_secret": "whsec_abc", "images_per_minute": 5}}',
    )
    assert main(["config", "--data-dir", str(tmp_path), "--port", "9001"]) == 0
    out = capsys.readouterr().out
    for secret in ("sk-live-0123456789abcdef", "short", "url-signing-secret", "pg-password", "whsec_abc"):
        assert secret not in out
    shown = json.loads(out)
    assert shown["port"] == 9001
    assert shown["data_dir"] == str(tmp_path)
    assert shown["api_keys"] == ["sk-l…", "********"]
    assert shown["url_secret"] == "********"
    assert shown["database_url"] == "postgresql+psycopg://app:********@db:5432/underpaint"
    assert shown["key_policies"] == {
        "sk-l…": {
            "images_per_minute": 5,
            "max_queued_tasks": None,
            "dedicated_lane": None,
            "webhook_secret": "********",
        }
    }
    assert shown["queue_backend"] == "local"


@pytest.mark.parametrize(
    ("env", "argv", "line"),
    [
        ({"UNDERPAINT_QUEUE_BACKEND": "celry"}, ["serve"], "setting queue_backend: 'celry' is not allowed"),
        ({}, ["serve", "--port", "-5"], "setting port: -5 is out of range; a port is 1 to 65535"),
        ({"UNDERPAINT_RUN_WORKER": "flase"}, ["worker"], "setting run_worker: 'flase' is not a boolean"),
    ],
)
def test_start_up_stops_with_one_line_and_exit_code_2(env: dict[str, str], argv: list[str], line: str) -> None:
    """The real command: no traceback, one line on stderr, exit code 2 (before anything starts)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("UNDERPAINT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "underpaint.cli", *argv],
        env={**clean, **env, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"underpaint {argv[0]}: error: {line}")
    assert "Traceback" not in proc.stderr
