"""The one weights reader (``engine.weights``): every engine entry point that reads a weights file goes through it,
so a pickle that names code is refused at each of them and never runs; nothing else in ``src`` reads weights."""

from __future__ import annotations

import ast
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from underpaint.engine import preprocessors
from underpaint.engine.adapters.controlnet import load_controlnet_model
from underpaint.engine.adapters.embeddings import read_embedding_file
from underpaint.engine.adapters.ip_adapter import read_ip_adapter_file
from underpaint.engine.adapters.lora import read_lora_file
from underpaint.engine.job import JobError
from underpaint.engine.loader import load_checkpoint, load_vae
from underpaint.engine.upscalers import load_upscaler
from underpaint.engine.weights import (
    ModelLoadError,
    UnreadableWeights,
    load_state_dict_file,
    read_weights,
    read_weights_mapping,
    unnest,
)
from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.vocabulary import PREPROCESSOR_FILES, PreprocessorName

CPU = torch.device("cpu")
SRC = Path(__file__).resolve().parents[2] / "src" / "underpaint"
REFUSED = "refused to load: the pickle names "


class _WritesMarker:
    """Unpickling this object writes ``marker``: what a malicious model file would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path, str]]:
        return (Path.write_text, (self.marker, "pwned"))


def _write_evil(path: Path, marker: Path, zipped: bool) -> Path:
    """A weights file that holds a tensor and the marker-writing object: ``torch.save``'s zip, or a bare pickle
    (torch's pre-zip format starts with one too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {"extra": _WritesMarker(marker), "weight": torch.zeros(2)}}
    if zipped:
        torch.save(payload, str(path))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path


def _entry(models: Path, kind: str, name: str) -> ModelEntry:
    entry = ModelRegistry(models).resolve(kind, name)
    assert entry is not None, f"{kind}/{name} not listed"
    return entry


def _annotator(models: Path) -> None:
    folder = models / "annotator"
    image = Image.new("RGB", (64, 64), (120, 30, 30))
    ctx = preprocessors.Context(folder, 1, CPU, preprocessors.AnnotatorCache(), 512)
    preprocessors.run_preprocessor("softedge_pidinet", image, ctx)


PIDINET_FILE = PREPROCESSOR_FILES[PreprocessorName("softedge_pidinet")][0]

# Each engine entry point that reads a single weights file: (models-folder kind, file name, how the engine reads it).
ENTRY_POINTS: dict[str, tuple[str, str, Callable[[Path], object]]] = {
    "checkpoint": ("checkpoint", "evil.ckpt", lambda m: load_checkpoint(_entry(m, "checkpoint", "evil"), CPU)),
    "vae": ("vae", "evil.pt", lambda m: load_vae(_entry(m, "vae", "evil"), CPU, torch.float32)),
    "lora": ("lora", "evil.pt", lambda m: read_lora_file(m / "lora" / "evil.pt")),
    "embedding": ("textualinversion", "evil.pt", lambda m: read_embedding_file(m / "textualinversion" / "evil.pt")),
    "ip-adapter": ("ipadapter", "evil.bin", lambda m: read_ip_adapter_file(m / "ipadapter" / "evil.bin")),
    "controlnet": (
        "controlnet",
        "evil.pth",
        lambda m: load_controlnet_model(_entry(m, "controlnet", "evil"), CPU, torch.float32),
    ),
    "upscaler": ("upscaler", "evil.pth", lambda m: load_upscaler(m / "upscaler" / "evil.pth")),
    "annotator": ("annotator", PIDINET_FILE, _annotator),
}


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path: Path) -> None:
    """The malicious files below really run code under a plain unpickler: their refusal is the reader's doing."""
    for zipped in (True, False):
        marker = tmp_path / f"ran-{zipped}.txt"
        path = _write_evil(tmp_path / f"evil-{zipped}.pt", marker, zipped)
        if zipped:
            torch.load(str(path), weights_only=False)
        else:
            pickle.loads(path.read_bytes())
        assert marker.read_text() == "pwned"


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-zip", "bare-pickle"])
@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_every_entry_point_refuses_a_code_pickle_through_the_one_reader(
    tmp_path: Path, entry_point: str, zipped: bool
) -> None:
    kind, name, read = ENTRY_POINTS[entry_point]
    models, marker = tmp_path / "models", tmp_path / "pwned.txt"
    _write_evil(models / kind / name, marker, zipped)
    with pytest.raises(JobError) as caught:
        read(models)
    # The reader's own wording: a caller with its own torch.load would fail with torch's message instead.
    assert REFUSED in str(caught.value), str(caught.value)
    assert name in str(caught.value)
    assert not marker.exists()


def test_a_diffusers_folder_with_a_code_pickle_is_refused_by_the_library_loader(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    """Diffusers folders (``from_pretrained``) are read by diffusers itself, which also unpickles with
    ``weights_only``: the same file in a ControlNet folder runs no code either."""
    models, marker = tmp_path / "models", tmp_path / "pwned.txt"
    folder = models / "controlnet" / "evil-folder"
    folder.mkdir(parents=True)
    shutil.copy2(tiny_models_dir / "controlnet" / "control_v11p_sd15_canny_diffusers" / "config.json", folder)
    _write_evil(folder / "diffusion_pytorch_model.bin", marker, zipped=True)
    with pytest.raises(JobError, match="could not be loaded") as caught:
        load_controlnet_model(_entry(models, "controlnet", "evil-folder"), CPU, torch.float32)
    assert not marker.exists()
    chain: list[BaseException] = []
    exc: BaseException | None = caught.value
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    refusals = [e for e in chain if isinstance(e, pickle.UnpicklingError)]
    assert refusals, chain  # torch's weights_only unpickler refused it (diffusers words it as a load error)
    assert "GLOBAL getattr was not an allowed global" in str(refusals[0])


def test_the_reader_keeps_what_the_file_stores(tmp_path: Path) -> None:
    st = tmp_path / "a.safetensors"
    safetensors.torch.save_file({"x": torch.ones(2)}, str(st), metadata={"name": "kept"})
    stored = read_weights(st)
    assert stored.metadata == {"name": "kept"}
    assert isinstance(stored.data, dict)
    assert torch.equal(stored.data["x"], torch.ones(2))
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"state_dict": {"w": torch.zeros(1)}}, "step": 3}, str(nested))
    assert read_weights(nested).metadata == {}
    assert read_weights_mapping(nested)["step"] == 3  # as stored
    assert list(load_state_dict_file(nested)) == ["w"]  # every state_dict level taken off
    assert list(unnest({"params_ema": {"a": 1}}, "params_ema")) == ["a"]
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), str(bare))
    assert isinstance(read_weights(bare).data, torch.Tensor)  # old embeddings are a bare tensor
    with pytest.raises(UnreadableWeights, match=r"^bare\.pt: not a state dict \(holds a Tensor\)$"):
        read_weights_mapping(bare)
    strings = tmp_path / "strings.pt"
    torch.save({"name": "no tensors"}, str(strings))
    with pytest.raises(ModelLoadError, match=r"^strings\.pt: contains no tensors$"):
        load_state_dict_file(strings)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("page.pth", b"<html>not found</html>", "cannot read weights"),
        ("page.safetensors", b"<html>not found</html>", "cannot read weights"),
        ("model.onnx", b"onnx", "unsupported weights format '.onnx'"),
    ],
)
def test_files_that_are_not_weights_name_the_file_and_the_reason(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UnreadableWeights) as caught:
        read_weights(path)
    assert (caught.value.name, caught.value.reason.startswith(reason)) == (name, True), caught.value.reason
    assert str(caught.value).startswith(f"{name}: {reason}")


# Calls that read weights (or unpickle anything): only the two reader modules may make them.
_READERS = {SRC / "engine" / "weights.py", SRC / "weight_headers.py"}
_READING_NAMES = {"safe_open", "load_file", "Unpickler", "load_from_file"}
_READING_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads")}


def _weight_reads(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in _READING_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.alias) and node.name in _READING_NAMES | {"load", "loads"}:
            found.append(f"import {node.name}")
        elif isinstance(node, ast.Attribute):
            if node.attr in _READING_NAMES:
                found.append(node.attr)
            elif isinstance(node.value, ast.Name) and (node.value.id, node.attr) in _READING_CALLS:
                found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_module_but_the_readers_reads_weights_files() -> None:
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        if path in _READERS:
            continue
        reads = _weight_reads(ast.parse(path.read_text(), str(path)))
        if reads:
            offenders[str(path.relative_to(SRC))] = reads
    assert offenders == {}
    # The scan sees what it looks for: the readers themselves are caught by it.
    assert "safe_open" in _weight_reads(ast.parse((SRC / "engine" / "weights.py").read_text()))
    assert "torch.load" in _weight_reads(ast.parse((SRC / "engine" / "weights.py").read_text()))
    assert "Unpickler" in str(_weight_reads(ast.parse((SRC / "weight_headers.py").read_text())))
