"""``underpaint pull`` against a local server answering like Hugging Face's and Civitai's download endpoints."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

import pytest
from tests.support.model_hub import Hub, running_hub

from underpaint.cli import main
from underpaint.delivery.model_download import PullError, parse_source, pull
from underpaint.registry import ModelRegistry


def safetensors_bytes(keys: list[str], filler: int = 3000) -> bytes:
    """A valid .safetensors file with one float32 tensor of ``filler`` values per key."""
    header: dict[str, object] = {}
    offset = 0
    for key in keys:
        header[key] = {"dtype": "F32", "shape": [filler], "data_offsets": [offset, offset + 4 * filler]}
        offset += 4 * filler
    text = json.dumps(header).encode()
    body = b"".join(struct.pack("<f", float(i % 7)) * filler for i, _ in enumerate(keys))
    return struct.pack("<Q", len(text)) + text + body


LORA = safetensors_bytes(["lora_unet_down_blocks_0.lora_down.weight", "lora_unet_down_blocks_0.lora_up.weight"])
CHECKPOINT = safetensors_bytes(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.x"])


@pytest.fixture
def hub() -> Iterator[Hub]:
    with running_hub(Hub(files={"detail.safetensors": LORA, "dream.safetensors": CHECKPOINT})) as h:
        h.civitai["4201"] = "dream.safetensors"
        yield h


class Endpoints(TypedDict):
    hf_endpoint: str
    civitai_endpoint: str


def endpoints(hub: Hub) -> Endpoints:
    return {"hf_endpoint": f"{hub.base}/hf", "civitai_endpoint": f"{hub.base}/civitai"}


def test_sources_map_to_the_hubs_download_endpoints() -> None:
    assert parse_source("hf:org/repo/sub/x.safetensors@v2").url == (
        "https://huggingface.co/org/repo/resolve/v2/sub/x.safetensors"
    )
    assert parse_source("civitai:128713").url == "https://civitai.com/api/download/models/128713"
    for bad in ("hf:org/x.safetensors", "civitai:abc", "ftp://x/y", "just-a-name"):
        with pytest.raises(PullError):
            parse_source(bad)


def test_hf_pull_follows_the_redirect_checks_the_linked_sha_and_files_it_by_its_tensors(
    hub: Hub, tmp_path: Path
) -> None:
    seen: list[tuple[int, int | None]] = []
    result = pull(
        "hf:someone/loras/detail.safetensors", tmp_path, on_progress=lambda d, t: seen.append((d, t)), **endpoints(hub)
    )
    assert result.path == tmp_path / "lora" / "detail.safetensors"
    assert result.kind == "lora"
    assert result.path.read_bytes() == LORA
    assert result.sha256 == hashlib.sha256(LORA).hexdigest()
    assert seen[-1] == (len(LORA), len(LORA))
    assert [e.sd_name for e in ModelRegistry(tmp_path).list("lora")] == ["detail.safetensors"]
    assert list((tmp_path / ".pulls").iterdir()) == []  # nothing half-written is left behind
    with pytest.raises(PullError, match="exists already"):
        pull("hf:someone/loras/detail.safetensors", tmp_path, **endpoints(hub))


def test_civitai_pull_takes_the_name_from_the_signed_download(hub: Hub, tmp_path: Path) -> None:
    result = pull("civitai:4201", tmp_path, **endpoints(hub))
    assert result.path == tmp_path / "checkpoint" / "dream.safetensors"
    assert result.path.read_bytes() == CHECKPOINT
    assert len(hub.requests) == 2  # the API's redirect, then the signed CDN URL


def test_a_wrong_checksum_deletes_the_download(hub: Hub, tmp_path: Path) -> None:
    hub.wrong_etag.add("detail.safetensors")
    with pytest.raises(PullError, match="does not match"):
        pull("hf:someone/loras/detail.safetensors", tmp_path, **endpoints(hub))
    with pytest.raises(PullError, match="does not match"):  # a given sha256 is checked the same way
        pull(f"{hub.base}/cdn/dream.safetensors", tmp_path, sha256="0" * 64)
    assert not (tmp_path / "lora").exists() or list((tmp_path / "lora").iterdir()) == []
    assert list((tmp_path / ".pulls").iterdir()) == []


def test_a_truncated_body_is_resumed_with_a_range_request(hub: Hub, tmp_path: Path) -> None:
    hub.truncate_next = True
    with pytest.raises(PullError, match="resume"):
        pull("hf:someone/loras/detail.safetensors", tmp_path, **endpoints(hub))
    (part,) = list((tmp_path / ".pulls").iterdir())
    assert 0 < part.stat().st_size < len(LORA)
    kept = part.stat().st_size
    result = pull("hf:someone/loras/detail.safetensors", tmp_path, **endpoints(hub))
    assert result.resumed_from == kept
    assert hub.requests[-1][1] == f"bytes={kept}-"
    assert result.path.read_bytes() == LORA  # and the sha256 over both parts matched the hub's


def test_a_server_ignoring_the_range_starts_over(hub: Hub, tmp_path: Path) -> None:
    hub.truncate_next = True
    with pytest.raises(PullError):
        pull(f"{hub.base}/cdn/detail.safetensors", tmp_path, kind="lora")
    hub.ignore_range = True
    result = pull(f"{hub.base}/cdn/detail.safetensors", tmp_path, kind="lora")
    assert result.resumed_from == 0
    assert result.path.read_bytes() == LORA


def test_unknown_files_and_names_are_refused(hub: Hub, tmp_path: Path) -> None:
    hub.files["notes.txt"] = b"hello"
    with pytest.raises(PullError, match="not a model file name"):
        pull(f"{hub.base}/cdn/notes.txt", tmp_path)
    hub.files["odd.safetensors"] = safetensors_bytes(["something.else"])
    with pytest.raises(PullError, match="give the kind"):
        pull(f"{hub.base}/cdn/odd.safetensors", tmp_path)
    with pytest.raises(PullError, match="HTTP 404"):
        pull(f"{hub.base}/cdn/missing.safetensors", tmp_path)


def test_cli_pull(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", f"{hub.base}/hf")
    models = tmp_path / "models"
    code = main(["pull", "--models-dir", str(models), "hf:someone/loras/detail.safetensors", "--name", "d.safetensors"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert (models / "lora" / "d.safetensors").read_bytes() == LORA
    assert hashlib.sha256(LORA).hexdigest() in out.out
    assert "100.0%" in out.err  # the progress bar reached the end
    assert main(["pull", "--models-dir", str(models), "civitai:nope", "--quiet"]) == 1
    assert "civitai:<model version id>" in capsys.readouterr().err
