"""The command line: demo-models writes the real formats, models lists them, webhook-secret prints a secret."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from underpaint.cli import main


def test_models_lists_every_kind(tiny_models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--models-dir", str(tiny_models_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    kinds = {r["type"] for r in rows}
    assert {"checkpoint", "vae", "lora", "textualinversion", "controlnet", "ipadapter"} <= kinds
    by_name = {r["sd_name"]: r for r in rows}
    assert by_name["tiny-sdxl.safetensors"]["base_model"] == "SDXL 1.0"
    assert by_name["tiny-sd15.safetensors"]["base_model"] == "SD 1.5"


def test_models_on_an_empty_folder_says_how_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--models-dir", str(tmp_path)]) == 0
    assert "demo-models" in capsys.readouterr().out


def test_webhook_secret_is_stable_per_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["webhook-secret", "--data-dir", str(tmp_path), "--key"]
    main([*args, "key-a"])
    first = capsys.readouterr().out.strip()
    main([*args, "key-a"])
    again = capsys.readouterr().out.strip()
    main([*args, "key-b"])
    other = capsys.readouterr().out.strip()
    assert first.startswith("whsec_")
    assert first == again
    assert first != other


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """``underpaint --help`` and every command's help: no reST double backquotes, and the settings order shown."""
    from underpaint.cli import build_parser

    commands = next(action for action in build_parser()._actions if action.dest == "command").choices
    assert commands is not None
    for argv in (["--help"], *([name, "--help"] for name in commands)):
        with pytest.raises(SystemExit) as info:
            main(list(argv))
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: underpaint")
        assert "``" not in out, argv
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "UNDERPAINT_* environment" in capsys.readouterr().out
