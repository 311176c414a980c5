"""The models folder, as the API and the engine see it.

Layout (folder names match ``filter.types``)::

    M/checkpoint/   *.safetensors | *.ckpt | <diffusers folder with model_index.json>
    M/lora/ M/vae/ M/textualinversion/ M/controlnet/ M/ipadapter/ M/annotator/
    M/upscaler/     *.pth | *.safetensors | ... (ESRGAN-family and other spandrel architectures)

A single-file model may carry a sidecar ``<stem>.config/`` folder (a diffusers config tree without weights) that
overrides the shipped config. The registry rescans a folder when its mtime changes, so dropping a file in is enough.
What a file holds (SD 1.5 or SDXL, inpainting, which folder it belongs in, whether it can load) is told from its
tensor names and shapes, read from its header by ``weight_headers`` (the API side never imports torch).

The registry owns the files' sha256 cache (``FileHashCache``, persisted under the data folder by ``wiring.py``).
With ``hash_in_background`` every file a scan finds is hashed by a background thread, so no task and no
``/v3/model`` request waits for a multi-GB hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from underpaint.weight_headers import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, tensor_names, tensor_shape, weights_problem

KINDS = ("checkpoint", "lora", "vae", "textualinversion", "controlnet", "ipadapter", "annotator", "upscaler")
WEIGHT_SUFFIXES = (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES, ".onnx")
SD15 = "SD 1.5"
SDXL = "SDXL 1.0"


@dataclass(frozen=True)
class ModelEntry:
    kind: str
    sd_name: str  # file or folder name, e.g. "dreamshaper_8.safetensors"
    path: Path
    is_sdxl: bool
    size: int
    mtime: float

    @property
    def stem(self) -> str:
        name = self.sd_name
        for suffix in WEIGHT_SUFFIXES:
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return name

    @property
    def sd_name_in_api(self) -> str:
        # Novita: checkpoints keep their extension, LoRAs and others are referenced without it.
        return self.sd_name if self.kind == "checkpoint" else self.stem

    @property
    def base_model(self) -> str:
        return SDXL if self.is_sdxl else SD15

    @property
    def id(self) -> int:
        """Stable positive int id derived from kind and name (the SDKs require an int)."""
        return zlib.crc32(f"{self.kind}/{self.sd_name}".encode()) & 0x7FFFFFFF

    @property
    def sidecar_config(self) -> Path | None:
        if self.path.is_dir():
            return None
        side = self.path.with_name(self.stem + ".config")
        return side if side.is_dir() else None


UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def unet_in_channels(path: Path) -> int | None:
    """The input channels of a checkpoint's UNet (4; 9 for inpainting checkpoints) from the file alone: the
    ``conv_in`` weight's shape in a safetensors header or a torch pickle's structure, or a diffusers folder's
    ``unet/config.json``. ``None`` when it cannot be told without loading the model."""
    try:
        if path.is_dir():
            config = path / "unet" / "config.json"
            data = json.loads(config.read_text()) if config.is_file() else None
            channels = data.get("in_channels") if isinstance(data, dict) else None
            return channels if isinstance(channels, int) else None
        shape = tensor_shape(path, UNET_CONV_IN)
    except (OSError, ValueError, struct.error):
        return None
    return shape[1] if shape is not None and len(shape) == 4 else None


def detect_sdxl(path: Path, kind: str) -> bool:
    """SD 1.5 vs SDXL from the file's keys (shapes in real files are reliable too, keys are cheaper)."""
    if kind == "upscaler":
        return False  # upscalers work on pixels, whatever the checkpoint
    try:
        if path.is_dir():
            index = path / "model_index.json"
            if index.exists():
                return "XL" in json.loads(index.read_text()).get("_class_name", "")
            cfg = path / "config.json"
            if cfg.exists():
                data = json.loads(cfg.read_text())
                return bool(data.get("addition_embed_type") == "text_time" or data.get("cross_attention_dim") == 2048)
            return False
        side = path.with_name(path.name.rsplit(".", 1)[0] + ".config") / "model_index.json"
        if side.exists():
            return "XL" in json.loads(side.read_text()).get("_class_name", "")
        found = tensor_names(path)
        if found is None:
            return "xl" in path.name.lower()
        keys = found
    except (OSError, ValueError, struct.error):
        return False
    if kind == "checkpoint":  # SDXL base: two text encoders; the SDXL refiner: OpenCLIP-G alone, as embedders.0
        return any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.model.")) for k in keys)
    if kind == "lora":
        return any(k.startswith(("lora_te2_", "lora_te1_", "text_encoder_2.")) for k in keys) or any(
            "input_blocks" in k and k.startswith("lora_unet_") for k in keys
        )
    if kind == "textualinversion":
        return "clip_g" in keys
    if kind == "controlnet":
        return any(k.startswith(("add_embedding.", "control_model.label_emb.")) for k in keys)
    if kind == "ipadapter":
        return "xl" in path.name.lower()
    return False


def kind_from_keys(keys: list[str]) -> str | None:
    """Which models folder a file's tensor names belong in (``underpaint pull`` without a kind); None if unclear."""
    if any(k.startswith(("model.diffusion_model.", "conditioner.embedders.")) for k in keys):
        return "checkpoint"
    if any(k.startswith(("lora_unet_", "lora_te", "lora_te1_", "lora_te2_")) or ".lora_down." in k for k in keys):
        return "lora"
    if any(k.startswith(("control_model.", "controlnet_cond_embedding.")) or "input_hint_block" in k for k in keys):
        return "controlnet"
    if any(k.startswith(("image_proj.", "ip_adapter.")) for k in keys):
        return "ipadapter"
    if {"emb_params", "clip_l", "clip_g", "string_to_param"} & set(keys) or any(
        k.startswith("string_to_param.") for k in keys
    ):
        return "textualinversion"
    stripped = [k.removeprefix("first_stage_model.") for k in keys]
    if stripped and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")) for k in stripped):
        return "vae"
    return None


# How a problem names a kind's files ("... holds a LoRA's tensors").
KIND_NOUNS = {
    "checkpoint": "a checkpoint",
    "lora": "a LoRA",
    "vae": "a VAE",
    "textualinversion": "an embedding",
    "controlnet": "a ControlNet",
    "ipadapter": "an IP-Adapter",
    "annotator": "an annotator",
    "upscaler": "an upscaler",
}


def kind_from_file(path: Path, name: str) -> str | None:
    """``kind_from_keys`` for a weights file (``name`` gives the format when ``path`` is a partial download)."""
    try:
        keys = tensor_names(path, name)
    except (OSError, ValueError, struct.error):
        return None
    return kind_from_keys(keys) if keys else None


# SD 1.5 single files: the CLIP-L text encoder's transformer layers, with or without HF's ``text_model.`` level.
_SD15_TEXT_LAYER = re.compile(r"^cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\.(\d+)\.")


def text_encoder_depth(entry: ModelEntry) -> int | None:
    """The number of transformer layers of an SD 1.5 checkpoint's text encoder, from its config (diffusers folder
    or sidecar, which the loader builds the encoder from) or else from its tensor names (safetensors header, or the
    pickle's keys); ``None`` when it cannot be told without loading the model. Cheap: no tensor is read."""
    try:
        folder = entry.path if entry.path.is_dir() else entry.sidecar_config
        config = folder / "text_encoder" / "config.json" if folder is not None else None
        if config is not None and config.is_file():
            data = json.loads(config.read_text())
            layers = data.get("num_hidden_layers") if isinstance(data, dict) else None
            return layers if isinstance(layers, int) and layers > 0 else None
        if entry.path.is_dir():
            return None
        keys = tensor_names(entry.path)
    except (OSError, ValueError, struct.error):
        return None
    found = {int(m.group(1)) for key in keys or () if (m := _SD15_TEXT_LAYER.match(key))}
    return max(found) + 1 if found else None


class FileHashCache:
    """sha256 of model files, computed lazily and cached by (path, mtime, size): real checkpoints are GBs.

    With ``persist_path`` the cache survives restarts (a JSON file; written atomically after each new hash).
    """

    def __init__(self, persist_path: Path | None = None) -> None:
        self.persist_path = persist_path
        self.computed = 0  # hashes computed (not found in the cache) by this process
        self._lock = threading.Lock()
        self._hashes: dict[str, tuple[float, int, str]] = {}
        if persist_path is not None and persist_path.exists():
            try:
                raw = json.loads(persist_path.read_text())
                self._hashes = {k: (float(v[0]), int(v[1]), str(v[2])) for k, v in raw.items()}
            except (OSError, ValueError, TypeError, IndexError, AttributeError):
                self._hashes = {}  # a damaged cache only costs rehashing

    def sha256(self, path: Path) -> str:
        """Hex sha256 of a file; for a folder (diffusers layout) the sha256 of its files' names and hashes."""
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{f.relative_to(path).as_posix()}\0{self.sha256(f)}\n".encode())
            return digest.hexdigest()
        st = path.stat()
        key = str(path.resolve())
        with self._lock:
            cached = self._hashes.get(key)
        if cached is not None and cached[0] == st.st_mtime and cached[1] == st.st_size:
            return cached[2]
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(8 * 1024 * 1024), b""):
                digest.update(chunk)
        value = digest.hexdigest()
        with self._lock:
            self._hashes[key] = (st.st_mtime, st.st_size, value)
            self._save()
        self.computed += 1
        return value

    def known(self, path: Path) -> bool:
        """Whether the file's hash is cached for its current mtime and size (folders: never cached whole)."""
        path = Path(path)
        try:
            if path.is_dir():
                return False
            st = path.stat()
        except OSError:
            return False
        with self._lock:
            cached = self._hashes.get(str(path.resolve()))
        return cached is not None and cached[0] == st.st_mtime and cached[1] == st.st_size

    def _save(self) -> None:
        if self.persist_path is None:
            return
        tmp = self.persist_path.with_name(self.persist_path.name + ".tmp")
        try:
            self.persist_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._hashes))
            os.replace(tmp, self.persist_path)
        except OSError:
            pass  # persistence is an optimisation; the in-memory cache still holds the value


def short_hash(sha256: str) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's sha256."""
    return sha256[:10]


class BackgroundHasher:
    """One daemon thread hashing the files it is given into a ``FileHashCache``, in order, each once."""

    def __init__(self, hashes: FileHashCache) -> None:
        self.hashes = hashes
        self._queue: queue.Queue[Path] = queue.Queue()
        self._pending: set[Path] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, paths: list[Path]) -> None:
        with self._lock:
            fresh = [p for p in paths if p not in self._pending and not self.hashes.known(p)]
            self._pending.update(fresh)
            for p in fresh:
                self._queue.put(p)
            if fresh and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="model-hasher", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                path = self._queue.get(timeout=5.0)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            try:
                self.hashes.sha256(path)
            except OSError:
                pass  # removed or unreadable since the scan: hashed (or reported) when used
            finally:
                with self._lock:
                    self._pending.discard(path)
                self._queue.task_done()

    def wait(self) -> None:
        """Until every submitted file is hashed."""
        self._queue.join()


class ModelRegistry:
    def __init__(
        self, models_dir: Path, hashes: FileHashCache | None = None, *, hash_in_background: bool = False
    ) -> None:
        self.models_dir = Path(models_dir)
        self.hashes = hashes if hashes is not None else FileHashCache()
        self.hasher = BackgroundHasher(self.hashes) if hash_in_background else None
        self._lock = threading.Lock()
        self._by_kind: dict[str, list[ModelEntry]] = {k: [] for k in KINDS}
        self._mtimes: dict[str, float] = {}
        self._depths: dict[tuple[Path, float, int], int | None] = {}
        self._problems: dict[tuple[Path, float, int], str | None] = {}
        self._channels: dict[tuple[Path, float, int], int | None] = {}
        self._misfiled: dict[tuple[Path, float, int], str | None] = {}

    def ensure_layout(self) -> None:
        for kind in KINDS:
            (self.models_dir / kind).mkdir(parents=True, exist_ok=True)

    def _scan_kind(self, kind: str) -> list[ModelEntry]:
        folder = self.models_dir / kind
        entries: list[ModelEntry] = []
        if not folder.is_dir():
            return entries
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or p.name.endswith(".config"):
                continue
            if p.is_dir():
                is_model = (p / "model_index.json").exists() or (p / "config.json").exists() or kind == "annotator"
                if not is_model:
                    continue
                size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            elif p.suffix.lower() in WEIGHT_SUFFIXES:
                size = p.stat().st_size
            else:
                continue
            entries.append(ModelEntry(kind, p.name, p, detect_sdxl(p, kind), size, p.stat().st_mtime))
        return entries

    def _refresh(self, kind: str) -> None:
        folder = self.models_dir / kind
        try:
            mtime = folder.stat().st_mtime
        except OSError:
            mtime = -1.0
        if self._mtimes.get(kind) != mtime:
            self._by_kind[kind] = self._scan_kind(kind)
            self._mtimes[kind] = mtime
            if self.hasher is not None and kind != "annotator":
                self.hasher.submit([e.path for e in self._by_kind[kind]])

    def list(self, kind: str | None = None) -> list[ModelEntry]:
        kinds = KINDS if kind is None else (kind,)
        with self._lock:
            out: list[ModelEntry] = []
            for k in kinds:
                if k not in self._by_kind:
                    continue
                self._refresh(k)
                out.extend(self._by_kind[k])
            return out

    def hash_sha256(self, entry: ModelEntry) -> str:
        """Full sha256 of the entry's file (or folder), cached; computed here only when the background hasher has
        not reached it yet (or there is none)."""
        return self.hashes.sha256(entry.path)

    def scan_and_hash(self) -> None:
        """Scan every folder now (which queues its files for the background hasher)."""
        self.list()

    def text_encoder_depth(self, entry: ModelEntry) -> int | None:
        """``text_encoder_depth(entry)`` (SD 1.5 checkpoints), cached per file version (path, mtime, size)."""
        key = (entry.path, entry.mtime, entry.size)
        with self._lock:
            if key in self._depths:
                return self._depths[key]
        depth = text_encoder_depth(entry)
        with self._lock:
            self._depths[key] = depth
        return depth

    def is_inpainting(self, entry: ModelEntry) -> bool:
        """A checkpoint whose UNet takes 9 input channels (``unet_in_channels``), cached per file version."""
        if entry.kind != "checkpoint":
            return False
        key = (entry.path, entry.mtime, entry.size)
        with self._lock:
            if key in self._channels:
                return self._channels[key] == 9
        channels = unet_in_channels(entry.path)
        with self._lock:
            self._channels[key] = channels
        return channels == 9

    def weights_problem(self, entry: ModelEntry) -> str | None:
        """``weight_headers.weights_problem(entry.path)``, cached per file version (path, mtime, size)."""
        key = (entry.path, entry.mtime, entry.size)
        with self._lock:
            if key in self._problems:
                return self._problems[key]
        problem = weights_problem(entry.path)
        with self._lock:
            self._problems[key] = problem
        return problem

    def misfiled(self, entry: ModelEntry) -> str | None:
        """Why a file cannot serve as its folder's kind because its tensor names say it is another kind's
        (``kind_from_keys``: a VAE or a LoRA filed as an upscaler), cached per file version; None when its names
        fit the folder or say nothing certain. Told from the header alone (the API never imports torch)."""
        key = (entry.path, entry.mtime, entry.size)
        with self._lock:
            if key in self._misfiled:
                return self._misfiled[key]
        found = kind_from_file(entry.path, entry.path.name) if entry.path.is_file() else None
        problem = None
        if found is not None and found != entry.kind:
            problem = (
                f"{entry.path.name} holds {KIND_NOUNS[found]}'s tensors, not {KIND_NOUNS[entry.kind]}'s "
                f"(it belongs in models/{found}/)"
            )
        with self._lock:
            self._misfiled[key] = problem
        return problem

    def resolve(self, kind: str, name: str) -> ModelEntry | None:
        """By ``sd_name`` or ``sd_name_in_api``, with or without extension, case-sensitive first."""
        if not name:
            return None
        entries = self.list(kind)
        bare = _strip_suffix(name)
        matchers: tuple[Callable[[ModelEntry], bool], ...] = (
            lambda e: e.sd_name == name,
            lambda e: e.stem == name,
            lambda e: e.stem == bare,
            lambda e: e.sd_name.lower() == name.lower() or e.stem.lower() == bare.lower(),
        )
        for match in matchers:
            found = [e for e in entries if match(e)]
            if found:
                return found[0]
        return None


def _strip_suffix(name: str) -> str:
    for suffix in WEIGHT_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
