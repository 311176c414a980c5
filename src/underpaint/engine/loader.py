"""Load checkpoints and VAE overrides from the models folder into diffusers objects, fully offline.

Single files (A1111/civitai ``.safetensors`` / ``.ckpt``) are read once into a state dict (pickles only through
``torch.load(weights_only=True)``), recognised as SD 1.5 or SDXL by their keys, and converted component by component
with diffusers' single-file converters against a config tree without weights: the file's sidecar ``<stem>.config/``
when present, else the shipped ``configs/sd15`` or ``configs/sdxl`` (field notes 3: without a local config diffusers
would go to the hub). Tokenizers come from the shipped ``configs/clip_tokenizer`` unless the config tree has its own.
Diffusers folders (``model_index.json``) go through ``from_pretrained(local_files_only=True)``.

The result is an img2img pipeline object (the container LoRA / textual inversion / IP-Adapter loading needs) plus
direct handles on its parts, wrapped in ``LoadedCheckpoint``. ``ModelCache`` keeps a byte-bounded LRU of them.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import pickle
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import safetensors.torch
import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_diffusers_clip_model_from_ldm

# Concrete module paths: the lazy top-level ``diffusers`` names are opaque to mypy.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from underpaint.config import Settings
from underpaint.engine.devices import empty_device_cache, pick_device, pick_dtype
from underpaint.engine.job import JobError
from underpaint.registry import ModelEntry, file_sha256, short_hash

CONFIG_ROOT = Path(__file__).parent / "configs"
SD15_CONFIG = CONFIG_ROOT / "sd15"
SDXL_CONFIG = CONFIG_ROOT / "sdxl"
TOKENIZER_DIR = CONFIG_ROOT / "clip_tokenizer"

StateDict = dict[str, torch.Tensor]
Img2ImgPipeline = StableDiffusionImg2ImgPipeline | StableDiffusionXLImg2ImgPipeline
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class _DropCastWarning(logging.Filter):
    """diffusers warns on every dtype cast that it has no fp32-pinned modules to keep ("...: []"): pure noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in") and "float32: []." in message)


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropCastWarning())


class ModelLoadError(JobError, ValueError):
    """A model file that cannot be used: unreadable, unsafe, or not the kind of model it is filed as. A ``JobError``
    (the task fails with this message); still a ``ValueError`` for callers outside a task."""


# ---------------------------------------------------------------------------------------------------- state dicts


def read_weights_file(path: Path) -> Mapping[str, Any]:
    """The top-level mapping of a ``.safetensors`` or pickle weights file, as stored (nesting such as ``state_dict``
    or Real-ESRGAN's ``params_ema`` kept); never runs pickled code. Raises ``ModelLoadError``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            raw: Any = safetensors.torch.load_file(str(path), device="cpu")
        elif suffix in _PICKLE_SUFFIXES:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise ModelLoadError(f"{path.name}: unsupported weights format {suffix!r}")
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{path.name}: refused to load: the pickle contains objects other than tensors "
            f"(possibly code); convert it to .safetensors ({str(exc).splitlines()[0]})"
        ) from exc
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors/torch raise many unrelated types for damaged files
        raise ModelLoadError(f"{path.name}: cannot read weights: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{path.name}: not a state dict")
    return raw


def load_state_dict_file(path: Path) -> StateDict:
    """Tensors of a ``.safetensors`` or pickle checkpoint, un-nested from ``state_dict``; never runs pickled code."""
    path = Path(path)
    raw: Any = read_weights_file(path)
    while isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelLoadError(f"{path.name}: contains no tensors")
    return tensors


def is_sdxl_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("conditioner.embedders.1.") for k in sd)


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class LoadedCheckpoint:
    name: str  # registry sd_name
    path: Path
    is_sdxl: bool
    pipe: Img2ImgPipeline
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]  # [CLIPTextModel] or [CLIPTextModel, CLIPTextModelWithProjection]
    tokenizers: list[CLIPTokenizer]
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    betas: tuple[float, float, int, str]  # (beta_start, beta_end, num_train_timesteps, beta_schedule)
    vae_scaling_factor: float
    device: torch.device
    dtype: torch.dtype
    approx_bytes: int
    config_dir: Path | None = None  # config tree used for a single file; None for diffusers folders

    @property
    def sha256(self) -> str:
        """Full sha256 of the checkpoint file (cached by path, mtime and size)."""
        return file_sha256(self.path)

    @property
    def sha256_short(self) -> str:
        """A1111's short hash (10 hex digits), as written in infotext ``Model hash:``."""
        return short_hash(self.sha256)


def module_bytes(*modules: torch.nn.Module) -> int:
    total = 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------- tokenizers


_tokenizer_templates: dict[tuple[str, str | None, tuple[tuple[str, int], ...]], CLIPTokenizer] = {}
_tokenizer_lock = threading.Lock()


def _tokenizer(path: Path, pad_token: str | None = None) -> CLIPTokenizer:
    """A private copy of the tokenizer at ``path``.

    ``CLIPTokenizer.from_pretrained`` leaks about 9 MB per call (measured with transformers 5.5.4), which adds up
    over checkpoint reloads; a deep copy of a cached template does not. Copies stay private because embeddings
    add tokens to a checkpoint's tokenizers.
    """
    # The files' mtimes are part of the key: a tokenizer replaced on disk is read again.
    stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
    key = (str(path), pad_token, stamp)
    with _tokenizer_lock:
        template = _tokenizer_templates.get(key)
        if template is None:
            if pad_token:
                template = CLIPTokenizer.from_pretrained(str(path), local_files_only=True, pad_token=pad_token)
            else:
                template = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            _tokenizer_templates[key] = template
        return copy.deepcopy(template)


def load_tokenizers(is_sdxl: bool, config_dir: Path | None = None) -> list[CLIPTokenizer]:
    """CLIP tokenizers from the config tree when it has them, else the shipped files (SDXL's second pads with "!")."""
    names = ["tokenizer", "tokenizer_2"] if is_sdxl else ["tokenizer"]
    out: list[CLIPTokenizer] = []
    for name in names:
        own = config_dir / name if config_dir is not None else None
        if own is not None and ((own / "vocab.json").exists() or (own / "tokenizer.json").exists()):
            out.append(_tokenizer(own))
        elif name == "tokenizer_2":
            out.append(_tokenizer(TOKENIZER_DIR, pad_token="!"))
        else:
            out.append(_tokenizer(TOKENIZER_DIR))
    return out


# ---------------------------------------------------------------------------------------------------- checkpoints


def _config_dir_for(entry: ModelEntry, is_sdxl: bool) -> Path:
    side = entry.sidecar_config
    if side is None:
        return SDXL_CONFIG if is_sdxl else SD15_CONFIG
    index = side / "model_index.json"
    if not index.exists():
        raise ModelLoadError(f"{entry.sd_name}: sidecar {side.name}/ has no model_index.json")
    side_xl = "XL" in json.loads(index.read_text()).get("_class_name", "")
    if side_xl != is_sdxl:
        kind = "SDXL" if is_sdxl else "SD 1.5"
        raise ModelLoadError(f"{entry.sd_name}: the file is {kind} but its sidecar {side.name}/ is not")
    return side


def _load_scheduler(config_dir: Path, v_prediction: bool) -> Any:
    cfg = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, cfg.get("_class_name", "PNDMScheduler"), None)
    if cls is None:
        raise ModelLoadError(f"{config_dir}: unknown scheduler class {cfg.get('_class_name')!r}")
    scheduler = cls.from_pretrained(str(config_dir), subfolder="scheduler", local_files_only=True)
    if v_prediction:
        scheduler = cls.from_config(scheduler.config, prediction_type="v_prediction")
    return scheduler


def _single_file_pipeline(entry: ModelEntry, dtype: torch.dtype) -> tuple[Img2ImgPipeline, Path]:
    sd = load_state_dict_file(entry.path)
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise ModelLoadError(
            f"{entry.sd_name}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights); "
            "LoRA, VAE and embedding files belong in their own folders"
        )
    is_sdxl = is_sdxl_state_dict(sd)
    config_dir = _config_dir_for(entry, is_sdxl)
    cfg = str(config_dir)
    common: dict[str, Any] = {"config": cfg, "local_files_only": True, "dtype": dtype}
    try:
        unet = UNet2DConditionModel.from_single_file(sd, subfolder="unet", **common)
        vae = AutoencoderKL.from_single_file(sd, subfolder="vae", **common)
        te1 = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, sd, subfolder="text_encoder", config=cfg, torch_dtype=dtype, local_files_only=True
        )
        te2 = (
            create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection,
                sd,
                subfolder="text_encoder_2",
                config=cfg,
                torch_dtype=dtype,
                local_files_only=True,
            )
            if is_sdxl
            else None
        )
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{entry.sd_name}: weights do not fit the config in {config_dir}: {exc}") from exc
    # Some v-prediction SDXL finetunes mark themselves with an empty "v_pred" tensor (A1111 reads it too).
    scheduler = _load_scheduler(config_dir, v_prediction="v_pred" in sd)
    del sd
    tokenizers = load_tokenizers(is_sdxl, config_dir)
    pipe: Img2ImgPipeline
    if te2 is not None:
        index = json.loads((config_dir / "model_index.json").read_text())
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=tokenizers[0],
            tokenizer_2=tokenizers[1],
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )
    else:
        pipe = StableDiffusionImg2ImgPipeline(
            vae=vae,
            text_encoder=te1,
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,  # type: ignore[arg-type]  # diffusers annotates these as required
            feature_extractor=None,  # type: ignore[arg-type]
            requires_safety_checker=False,
        )
    return pipe, config_dir


def _folder_pipeline(entry: ModelEntry, dtype: torch.dtype) -> Img2ImgPipeline:
    index_path = entry.path / "model_index.json"
    if not index_path.exists():
        raise ModelLoadError(f"{entry.sd_name}: folder has no model_index.json (not a diffusers pipeline)")
    index = json.loads(index_path.read_text())
    is_sdxl = "XL" in index.get("_class_name", "")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    # Tokenizers come from our template cache, never from the pipeline's from_pretrained (which leaks, see
    # ``_tokenizer``); folders without tokenizer files get the shipped ones.
    fallback = load_tokenizers(is_sdxl)
    for i, name in enumerate(["tokenizer", "tokenizer_2"] if is_sdxl else ["tokenizer"]):
        own = entry.path / name
        kwargs[name] = _tokenizer(own) if own.is_dir() else fallback[i]
    cls: type[Img2ImgPipeline]
    if is_sdxl:
        cls = StableDiffusionXLImg2ImgPipeline
        kwargs["requires_aesthetics_score"] = False
    else:
        cls = StableDiffusionImg2ImgPipeline
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(str(entry.path), **kwargs)
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{entry.sd_name}: cannot load diffusers folder: {exc}") from exc


def load_checkpoint(
    entry: ModelEntry, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Build an img2img pipeline for a checkpoint entry (single file or diffusers folder), offline."""
    if entry.kind != "checkpoint":
        raise ModelLoadError(f"{entry.sd_name}: is a {entry.kind}, not a checkpoint")
    dev = pick_device(str(device)) if device is not None else pick_device("auto")
    dt = dtype if dtype is not None else pick_dtype(dev)
    config_dir: Path | None = None
    if entry.path.is_dir():
        pipe = _folder_pipeline(entry, dt)
    else:
        pipe, config_dir = _single_file_pipeline(entry, dt)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    is_sdxl = isinstance(pipe, StableDiffusionXLImg2ImgPipeline)
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else [])
    sched = pipe.scheduler.config
    return LoadedCheckpoint(
        name=entry.sd_name,
        path=entry.path,
        is_sdxl=is_sdxl,
        pipe=pipe,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        betas=(
            float(sched["beta_start"]),
            float(sched["beta_end"]),
            int(sched["num_train_timesteps"]),
            str(sched["beta_schedule"]),
        ),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        device=dev,
        dtype=dt,
        approx_bytes=module_bytes(pipe.unet, pipe.vae, *text_encoders),
        config_dir=config_dir,
    )


# ---------------------------------------------------------------------------------------------------- VAE override


def _vae_config(entry: ModelEntry, like: LoadedCheckpoint | None) -> dict[str, Any]:
    """Sidecar config > the checkpoint's own VAE config (A1111 keeps the checkpoint's scale) > shipped config."""
    side = entry.sidecar_config
    config: dict[str, Any] | None = None
    if side is not None:
        for candidate in (side / "config.json", side / "vae" / "config.json"):
            if candidate.exists():
                config = dict(json.loads(candidate.read_text()))
                break
        else:
            raise ModelLoadError(f"{entry.sd_name}: sidecar {side.name}/ has no config.json")
    elif like is not None:
        config = dict(like.vae.config)
    else:
        shipped = (SDXL_CONFIG if entry.is_sdxl else SD15_CONFIG) / "vae" / "config.json"
        config = dict(json.loads(shipped.read_text()))
    if like is not None:
        config["scaling_factor"] = like.vae_scaling_factor
    return config


def load_vae(
    entry: ModelEntry,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    like: LoadedCheckpoint | None = None,
) -> AutoencoderKL:
    """A VAE override from ``M/vae/``: A1111 single file (LDM keys, optionally ``first_stage_model.``-prefixed, or
    diffusers keys) or a diffusers folder; always a new module (the checkpoint's own VAE is never touched).

    Architecture: the file's sidecar ``<stem>.config/`` (``config.json`` or ``vae/config.json``), else ``like``'s
    VAE config, else the shipped SD VAE config (SD 1.5 and SDXL VAEs share it). ``like`` is the checkpoint the VAE
    will serve: it also gives the scaling factor (A1111 keeps the checkpoint's) and the default device/dtype."""
    if like is not None:
        dev = like.device if device is None else torch.device(device)
        dt = like.dtype if dtype is None else dtype
    else:
        dev = pick_device(str(device)) if device is not None else pick_device("auto")
        dt = dtype if dtype is not None else pick_dtype(dev)
    if entry.path.is_dir():
        try:
            vae = AutoencoderKL.from_pretrained(str(entry.path), local_files_only=True, dtype=dt)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"{entry.sd_name}: cannot load diffusers VAE folder: {exc}") from exc
        if like is not None:
            vae.register_to_config(scaling_factor=like.vae_scaling_factor)
        return vae.to(dev).eval()
    sd = load_state_dict_file(entry.path)
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    sd = {k: v for k, v in sd.items() if k.startswith(_VAE_PARTS)}
    if not sd:
        raise ModelLoadError(f"{entry.sd_name}: no VAE weights (encoder.*/decoder.*) in the file")
    config = _vae_config(entry, like)
    diffusers_layout = any(".down_blocks." in k or ".up_blocks." in k for k in sd)
    converted = sd if diffusers_layout else convert_ldm_vae_checkpoint(sd, config)
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    try:
        vae.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{entry.sd_name}: VAE weights do not fit the VAE architecture: {exc}") from exc
    return vae.to(device=dev, dtype=dt).eval()


# ---------------------------------------------------------------------------------------------------- cache


@dataclass
class CacheStats:
    checkpoint_loads: int = 0
    checkpoint_hits: int = 0
    vae_loads: int = 0
    evictions: int = 0


@dataclass
class _Slot:
    key: tuple[str, float, int]
    value: LoadedCheckpoint


class ModelCache:
    """Thread-safe LRU of loaded checkpoints bounded by ``budget_bytes`` (always keeps the newest one), plus a small
    LRU of VAE overrides. Loads run under the lock: one model is built at a time, which also bounds peak memory."""

    def __init__(
        self,
        settings_or_budget: Settings | int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_vaes: int = 2,
    ) -> None:
        if isinstance(settings_or_budget, Settings):
            self.budget_bytes = settings_or_budget.checkpoint_cache_bytes
            default_device = settings_or_budget.device
            default_dtype: str = settings_or_budget.dtype
        else:
            self.budget_bytes = int(settings_or_budget)
            default_device = default_dtype = "auto"
        self.device = pick_device(str(device) if device is not None else default_device)
        self.dtype = dtype if dtype is not None else pick_dtype(self.device, default_dtype)
        self.max_vaes = max_vaes
        self.stats = CacheStats()
        self._lock = threading.RLock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._vaes: OrderedDict[tuple[Any, ...], AutoencoderKL] = OrderedDict()

    @staticmethod
    def _key(entry: ModelEntry) -> tuple[str, float, int]:
        return (str(entry.path), entry.mtime, entry.size)

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(s.value.approx_bytes for s in self._slots.values())

    def loaded_names(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return [s.value.name for s in self._slots.values()]

    def get(self, entry: ModelEntry) -> LoadedCheckpoint:
        path = str(entry.path)
        with self._lock:
            slot = self._slots.get(path)
            if slot is not None and slot.key == self._key(entry):
                self._slots.move_to_end(path)
                self.stats.checkpoint_hits += 1
                return slot.value
            if slot is not None:  # the file changed on disk
                self._evict(path)
            # Make room first (the file size approximates the loaded size) so two models never peak together.
            self._shrink(self.budget_bytes - entry.size)
            loaded = load_checkpoint(entry, self.device, self.dtype)
            self.stats.checkpoint_loads += 1
            self._slots[path] = _Slot(self._key(entry), loaded)
            self._shrink(self.budget_bytes, keep=path)
            return loaded

    def get_vae(self, entry: ModelEntry, like: LoadedCheckpoint) -> AutoencoderKL:
        """A VAE override for ``like`` (cached; never the checkpoint's own VAE object, which stays untouched)."""
        config_key = json.dumps(dict(like.vae.config), sort_keys=True, default=str)
        key = (str(entry.path), entry.mtime, entry.size, config_key, str(like.device), str(like.dtype))
        with self._lock:
            vae = self._vaes.get(key)
            if vae is not None:
                self._vaes.move_to_end(key)
                return vae
            vae = load_vae(entry, like=like)
            self.stats.vae_loads += 1
            self._vaes[key] = vae
            while len(self._vaes) > self.max_vaes:
                self._vaes.popitem(last=False)
            return vae

    def clear(self) -> None:
        with self._lock:
            for path in list(self._slots):
                self._evict(path)
            self._vaes.clear()
            _free_memory()

    def _shrink(self, limit: int, keep: str | None = None) -> None:
        evicted = False
        while self._slots and sum(s.value.approx_bytes for s in self._slots.values()) > limit:
            oldest = next(iter(self._slots))
            if oldest == keep:
                break
            self._evict(oldest)
            evicted = True
        if evicted:
            _free_memory()

    def _evict(self, path: str) -> None:
        self._slots.pop(path, None)
        self.stats.evictions += 1


def _free_memory() -> None:
    gc.collect()
    empty_device_cache()
