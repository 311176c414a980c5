"""Load checkpoints and VAE overrides from the models folder into diffusers objects, fully offline.

Single files (A1111/civitai ``.safetensors`` / ``.ckpt``) are read once into a state dict by ``engine.weights`` (the
one weights reader: pickles only through ``torch.load(weights_only=True)``), recognised as SD 1.5 or SDXL by their keys, and converted component by component
with diffusers' single-file converters against a config tree without weights: the file's sidecar ``<stem>.config/``
when present, else the shipped ``configs/sd15`` or ``configs/sdxl`` (field notes 3: without a local config diffusers
would go to the hub). Tokenizers come from the shipped ``configs/clip_tokenizer`` unless the config tree has its own.
Diffusers folders (``model_index.json``) go through ``from_pretrained(local_files_only=True)`` when they need new
modules; a folder is its own config tree, so a switch to or from one can copy into resident modules too.

The result is an img2img pipeline object (the container LoRA / textual inversion / IP-Adapter loading needs) plus
direct handles on its parts, wrapped in ``LoadedCheckpoint``. ``ModelCache`` keeps a byte-bounded LRU of them.
"""

from __future__ import annotations

import copy
import gc
import inspect
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import diffusers
import torch
from accelerate import init_empty_weights
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)

# Concrete module paths: the lazy top-level ``diffusers`` names are opaque to mypy.
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
    StableDiffusionXLImg2ImgPipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from underpaint.config import Settings
from underpaint.engine.devices import empty_device_cache, pick_device, pick_dtype
from underpaint.engine.lru import logged_load
from underpaint.engine.model_tiers import ModelCacheReport
from underpaint.engine.unet_resize import use_a1111_skip_resize
from underpaint.engine.weights import ModelLoadError, StateDict, load_state_dict_file
from underpaint.registry import UNET_CONV_IN, ModelEntry

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "configs"
SD15_CONFIG = CONFIG_ROOT / "sd15"
SDXL_CONFIG = CONFIG_ROOT / "sdxl"
SDXL_REFINER_CONFIG = CONFIG_ROOT / "sdxl_refiner"
REFINER_TE_PREFIX = "conditioner.embedders.0.model."
TOKENIZER_DIR = CONFIG_ROOT / "clip_tokenizer"

Img2ImgPipeline = StableDiffusionImg2ImgPipeline | StableDiffusionXLImg2ImgPipeline
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


class _DropCastWarning(logging.Filter):
    """diffusers warns on every dtype cast that it has no fp32-pinned modules to keep ("...: []"): pure noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in") and "float32: []." in message)


logging.getLogger("diffusers.models.modeling_utils").addFilter(_DropCastWarning())


# ---------------------------------------------------------------------------------------------------- state dicts


def is_sdxl_state_dict(sd: Mapping[str, Any]) -> bool:
    return any(k.startswith("conditioner.embedders.1.") for k in sd) or is_sdxl_refiner_state_dict(sd)


def is_sdxl_refiner_state_dict(sd: Mapping[str, Any]) -> bool:
    """The SDXL refiner (A1111 single file): its only text encoder, OpenCLIP-G, is ``conditioner.embedders.0.model``."""
    return any(k.startswith(REFINER_TE_PREFIX) for k in sd)


def unet_in_channels(sd: Mapping[str, Any]) -> int:
    """The UNet's input channels from its first convolution: 4, or 9 for inpainting checkpoints."""
    weight = sd.get(UNET_CONV_IN)
    return int(weight.shape[1]) if weight is not None else 4


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class LoadedCheckpoint:
    name: str  # registry sd_name
    path: Path
    is_sdxl: bool
    pipe: Img2ImgPipeline
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    # [CLIPTextModel] or [CLIPTextModel, CLIPTextModelWithProjection]; the SDXL refiner: [CLIPTextModelWithProjection]
    text_encoders: list[torch.nn.Module]
    tokenizers: list[CLIPTokenizer]
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    betas: tuple[float, float, int, str]  # (beta_start, beta_end, num_train_timesteps, beta_schedule)
    vae_scaling_factor: float
    device: torch.device
    dtype: torch.dtype
    approx_bytes: int
    config_dir: Path | None = None  # config tree: a single file's sidecar or shipped tree; a folder itself
    is_refiner: bool = False  # the SDXL refiner: OpenCLIP-G only, aesthetic-score conditioning


def module_bytes(*modules: torch.nn.Module) -> int:
    total = 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------------------------- tokenizers


class TokenizerTemplates:
    """Tokenizers read once per folder (and file mtimes), handed out as private copies; owned by the model cache.

    ``CLIPTokenizer.from_pretrained`` leaks about 9 MB per call (measured with transformers 5.5.4), which adds up
    over checkpoint reloads; a deep copy of a cached template does not. Copies stay private because embeddings
    add tokens to a checkpoint's tokenizers.
    """

    def __init__(self) -> None:
        self._templates: dict[tuple[str, str | None, tuple[tuple[str, int], ...]], CLIPTokenizer] = {}
        self._lock = threading.Lock()

    def copy(self, path: Path, pad_token: str | None = None) -> CLIPTokenizer:
        # The files' mtimes are part of the key: a tokenizer replaced on disk is read again.
        stamp = tuple(sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file()))
        key = (str(path), pad_token, stamp)
        with self._lock:
            template = self._templates.get(key)
            if template is None:
                if pad_token:
                    template = CLIPTokenizer.from_pretrained(str(path), local_files_only=True, pad_token=pad_token)
                else:
                    template = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
                self._templates[key] = template
            return copy.deepcopy(template)


def load_tokenizers(
    is_sdxl: bool, config_dir: Path | None = None, templates: TokenizerTemplates | None = None
) -> list[CLIPTokenizer]:
    """CLIP tokenizers from the config tree when it has them, else the shipped files (SDXL's second pads with "!")."""
    tok = templates if templates is not None else TokenizerTemplates()
    names = ["tokenizer", "tokenizer_2"] if is_sdxl else ["tokenizer"]
    out: list[CLIPTokenizer] = []
    for name in names:
        own = config_dir / name if config_dir is not None else None
        if own is not None and ((own / "vocab.json").exists() or (own / "tokenizer.json").exists()):
            out.append(tok.copy(own))
        elif name == "tokenizer_2":
            out.append(tok.copy(TOKENIZER_DIR, pad_token="!"))
        else:
            out.append(tok.copy(TOKENIZER_DIR))
    return out


# ---------------------------------------------------------------------------------------------------- checkpoints


def _config_dir_for(entry: ModelEntry, is_sdxl: bool, is_refiner: bool = False) -> Path:
    side = entry.sidecar_config
    if side is None:
        return SDXL_REFINER_CONFIG if is_refiner else SDXL_CONFIG if is_sdxl else SD15_CONFIG
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


@dataclass
class CheckpointWeights:
    """A checkpoint's weights in diffusers' keys, per component (``unet``, ``vae``, ``text_encoder``,
    ``text_encoder_2``), in the file's own dtype, on the CPU (pinned when the device is CUDA): a single file
    converted, or a diffusers folder's component files as stored (``config_dir`` is then the folder). What the RAM
    tier keeps, and what an in-place switch copies from."""

    components: dict[str, StateDict]
    is_sdxl: bool
    v_prediction: bool
    config_dir: Path

    @property
    def architecture(self) -> str | None:
        return architecture_of(self.config_dir)

    @property
    def nbytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for part in self.components.values():
            for t in part.values():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
        return total

    def pinned(self) -> CheckpointWeights:
        """A copy in page-locked memory (a host-to-device copy from it runs at full bus speed, asynchronously)."""
        parts = {name: {k: t.pin_memory() for k, t in part.items()} for name, part in self.components.items()}
        return CheckpointWeights(parts, self.is_sdxl, self.v_prediction, self.config_dir)


class _OpenClipConfig:
    """What ``convert_open_clip_checkpoint`` reads from its model argument (only when the file lacks a projection)."""

    def __init__(self, hidden_size: int) -> None:
        self.config = type("Config", (), {"hidden_size": hidden_size})()


def _read_single_file(entry: ModelEntry) -> StateDict:
    sd = load_state_dict_file(entry.path)
    if not any(k.startswith("model.diffusion_model.") for k in sd):
        raise ModelLoadError(
            f"{entry.sd_name}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights); "
            "LoRA, VAE and embedding files belong in their own folders"
        )
    return sd


def convert_checkpoint(sd: StateDict, entry: ModelEntry) -> CheckpointWeights:
    """The components of an A1111 single file in diffusers' keys, with diffusers' own converters (mostly views of
    ``sd``'s tensors: no copy). Text encoder keys carry transformers' ``text_model.`` level; ``copy_into`` matches
    them to modules with or without it."""
    is_sdxl = is_sdxl_state_dict(sd)
    is_refiner = is_sdxl_refiner_state_dict(sd)
    config_dir = _config_dir_for(entry, is_sdxl, is_refiner)
    try:
        unet_config = UNet2DConditionModel.load_config(str(config_dir), subfolder="unet", local_files_only=True)
        vae_config = AutoencoderKL.load_config(str(config_dir), subfolder="vae", local_files_only=True)
        parts: dict[str, StateDict] = {
            "unet": convert_ldm_unet_checkpoint(sd, unet_config),
            "vae": convert_ldm_vae_checkpoint(sd, vae_config),
        }
        if not is_refiner:
            parts["text_encoder"] = convert_ldm_clip_checkpoint(sd)
        if is_sdxl:
            te2 = json.loads((config_dir / "text_encoder_2" / "config.json").read_text())
            prefix = REFINER_TE_PREFIX if is_refiner else "conditioner.embedders.1.model."
            parts["text_encoder_2"] = convert_open_clip_checkpoint(
                _OpenClipConfig(int(te2["hidden_size"])), sd, prefix=prefix
            )
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{entry.sd_name}: weights do not fit the config in {config_dir}: {exc}") from exc
    return CheckpointWeights(parts, is_sdxl, "v_pred" in sd, config_dir)


class NotCopyable(ModelLoadError):
    """A diffusers folder whose weights the in-place path does not read (only variant files, an unknown layout):
    it loads through ``from_pretrained`` into new modules."""


_FOLDER_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _folder_index(entry: ModelEntry) -> dict[str, Any]:
    index_path = entry.path / "model_index.json"
    if not index_path.exists():
        raise ModelLoadError(f"{entry.sd_name}: folder has no model_index.json (not a diffusers pipeline)")
    index = json.loads(index_path.read_text())
    if not isinstance(index, dict):
        raise ModelLoadError(f"{entry.sd_name}: model_index.json is not an object")
    return index


def _component_files(folder: Path) -> list[Path] | None:
    """The weight files ``from_pretrained`` reads for one component (no variant asked for): the single
    safetensors file, the shards its index names, or the legacy pickle; None when there is none of these."""
    for stem in ("diffusion_pytorch_model", "model"):
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = json.loads(index.read_text()).get("weight_map", {})
            return [folder / name for name in sorted(set(shards.values()))]
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return None


def read_folder_weights(entry: ModelEntry) -> CheckpointWeights:
    """A diffusers folder's model components as stored (their keys are diffusers' and transformers' module keys
    already; text encoders keep the ``text_model.`` level). Raises ``NotCopyable`` for a layout it does not read."""
    index = _folder_index(entry)
    parts: dict[str, StateDict] = {}
    for name in _FOLDER_PARTS:
        spec = index.get(name)
        if not isinstance(spec, list) or not spec or spec[0] is None:
            continue  # not in this pipeline (the SDXL refiner has no text_encoder)
        files = _component_files(entry.path / name)
        if files is None:
            raise NotCopyable(f"{entry.sd_name}: {name}/ has no weights file read without a variant")
        tensors: StateDict = {}
        for file in files:
            tensors.update(load_state_dict_file(file))
        parts[name] = tensors
    if "unet" not in parts or "vae" not in parts:
        raise NotCopyable(f"{entry.sd_name}: model_index.json names no unet or vae")
    return CheckpointWeights(parts, "XL" in str(index.get("_class_name", "")), False, entry.path)


def read_checkpoint_weights(entry: ModelEntry) -> CheckpointWeights:
    """Read a checkpoint's weights (what the RAM tier holds; the prefetcher calls this): a single file read and
    converted, or a diffusers folder's component files."""
    if entry.path.is_dir():
        return read_folder_weights(entry)
    return convert_checkpoint(_read_single_file(entry), entry)


def _assemble_pipeline(
    config_dir: Path,
    is_sdxl: bool,
    modules: dict[str, torch.nn.Module],
    v_prediction: bool,
    templates: TokenizerTemplates | None,
) -> Img2ImgPipeline:
    scheduler = _load_scheduler(config_dir, v_prediction)
    tokenizers = load_tokenizers(is_sdxl, config_dir, templates)
    if is_sdxl:
        # The SDXL refiner has no CLIP-L: diffusers' pipeline takes None for it.
        refiner = "text_encoder" not in modules
        index = json.loads((config_dir / "model_index.json").read_text())
        return StableDiffusionXLImg2ImgPipeline(
            vae=cast(AutoencoderKL, modules["vae"]),
            text_encoder=cast(CLIPTextModel, modules.get("text_encoder")),
            text_encoder_2=cast(CLIPTextModelWithProjection, modules["text_encoder_2"]),
            tokenizer=cast(CLIPTokenizer, None if refiner else tokenizers[0]),
            tokenizer_2=tokenizers[1],
            unet=cast(UNet2DConditionModel, modules["unet"]),
            scheduler=scheduler,
            requires_aesthetics_score=refiner,
            force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        )
    return StableDiffusionImg2ImgPipeline(
        vae=cast(AutoencoderKL, modules["vae"]),
        text_encoder=cast(CLIPTextModel, modules["text_encoder"]),
        tokenizer=tokenizers[0],
        unet=cast(UNet2DConditionModel, modules["unet"]),
        scheduler=scheduler,
        safety_checker=None,  # type: ignore[arg-type]  # diffusers annotates these as required
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


def _single_file_pipeline(
    entry: ModelEntry, sd: StateDict, dtype: torch.dtype, templates: TokenizerTemplates | None
) -> tuple[Img2ImgPipeline, Path]:
    is_sdxl = is_sdxl_state_dict(sd)
    is_refiner = is_sdxl_refiner_state_dict(sd)
    config_dir = _config_dir_for(entry, is_sdxl, is_refiner)
    cfg = str(config_dir)
    common: dict[str, Any] = {"config": cfg, "local_files_only": True, "dtype": dtype}
    modules: dict[str, torch.nn.Module] = {}
    try:
        # Inpainting checkpoints (9 input channels) load over the same config, told their conv_in width.
        in_channels = unet_in_channels(sd)
        modules["unet"] = UNet2DConditionModel.from_single_file(sd, subfolder="unet", in_channels=in_channels, **common)
        modules["vae"] = AutoencoderKL.from_single_file(sd, subfolder="vae", **common)
        if not is_refiner:
            modules["text_encoder"] = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, sd, subfolder="text_encoder", config=cfg, torch_dtype=dtype, local_files_only=True
            )
        if is_sdxl:
            modules["text_encoder_2"] = create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection,
                sd,
                subfolder="text_encoder_2",
                config=cfg,
                torch_dtype=dtype,
                local_files_only=True,
            )
    except (ValueError, RuntimeError, KeyError, OSError) as exc:
        raise ModelLoadError(f"{entry.sd_name}: weights do not fit the config in {config_dir}: {exc}") from exc
    # Some v-prediction SDXL finetunes mark themselves with an empty "v_pred" tensor (A1111 reads it too).
    return _assemble_pipeline(config_dir, is_sdxl, modules, "v_pred" in sd, templates), config_dir


def _folder_pipeline(entry: ModelEntry, dtype: torch.dtype, templates: TokenizerTemplates | None) -> Img2ImgPipeline:
    index = _folder_index(entry)
    is_sdxl = "XL" in index.get("_class_name", "")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    # Tokenizers come from our template cache, never from the pipeline's from_pretrained (which leaks, see
    # ``TokenizerTemplates``); folders without tokenizer files get the shipped ones.
    tok = templates if templates is not None else TokenizerTemplates()
    fallback = load_tokenizers(is_sdxl, templates=tok)
    for i, name in enumerate(["tokenizer", "tokenizer_2"] if is_sdxl else ["tokenizer"]):
        own = entry.path / name
        kwargs[name] = tok.copy(own) if own.is_dir() else fallback[i]
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


def _wrap(
    entry: ModelEntry, pipe: Img2ImgPipeline, dev: torch.device, dt: torch.dtype, config_dir: Path | None
) -> LoadedCheckpoint:
    pipe.set_progress_bar_config(disable=True)
    is_sdxl = isinstance(pipe, StableDiffusionXLImg2ImgPipeline)
    is_refiner = is_sdxl and pipe.text_encoder is None
    text_encoders = [e for e in [pipe.text_encoder] + ([pipe.text_encoder_2] if is_sdxl else []) if e is not None]
    tokenizers = [t for t in [pipe.tokenizer] + ([pipe.tokenizer_2] if is_sdxl else []) if t is not None]
    sched = pipe.scheduler.config
    use_a1111_skip_resize(pipe.unet)  # A1111's pixels at sizes that are not multiples of 64
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
        is_refiner=is_refiner,
    )


def load_checkpoint(
    entry: ModelEntry,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    tokenizers: TokenizerTemplates | None = None,
    state_dict: StateDict | None = None,
) -> LoadedCheckpoint:
    """Build an img2img pipeline for a checkpoint entry (single file or diffusers folder), offline, in new modules.
    ``state_dict``: the single file's tensors when the caller has read them already."""
    if entry.kind != "checkpoint":
        raise ModelLoadError(f"{entry.sd_name}: is a {entry.kind}, not a checkpoint")
    dev = pick_device(str(device)) if device is not None else pick_device("auto")
    dt = dtype if dtype is not None else pick_dtype(dev)
    config_dir: Path | None = None
    if entry.path.is_dir():
        pipe = _folder_pipeline(entry, dt, tokenizers)
        config_dir = entry.path
    else:
        sd = state_dict if state_dict is not None else _read_single_file(entry)
        pipe, config_dir = _single_file_pipeline(entry, sd, dt, tokenizers)
        del sd
    pipe.to(dev)
    return _wrap(entry, pipe, dev, dt, config_dir)


class ArchitectureMismatch(ModelLoadError):
    """The weights do not fit the resident modules (another family, config or shape): they need new modules."""


def _module_parts(loaded: LoadedCheckpoint) -> dict[str, torch.nn.Module]:
    parts: dict[str, torch.nn.Module] = {"unet": loaded.unet, "vae": loaded.vae}
    names = ("text_encoder_2",) if loaded.is_refiner else ("text_encoder", "text_encoder_2")
    for name, encoder in zip(names, loaded.text_encoders, strict=False):
        parts[name] = encoder
    return parts


def _restore_token_rows(encoder: torch.nn.Module, rows: int) -> None:
    """Embeddings (textual inversion) grow a text encoder's token table; a new checkpoint starts from its own size."""
    get = getattr(encoder, "get_input_embeddings", None)
    table = get() if callable(get) else None
    if not isinstance(table, torch.nn.Embedding) or table.num_embeddings == rows:
        return
    weight = table.weight
    fresh = torch.nn.Embedding(rows, table.embedding_dim, device=weight.device, dtype=weight.dtype)
    encoder.set_input_embeddings(fresh)  # type: ignore[operator]
    encoder.config.vocab_size = rows  # type: ignore[union-attr]


_DIFFUSERS_CONFIGS: dict[str, type[Any]] = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
# What a saved config records about the file rather than the model (transformers writes these on save_pretrained).
_CONFIG_METADATA = frozenset({"architectures", "dtype", "torch_dtype", "transformers_version"})


def _normalized_config(sub: str, data: dict[str, Any]) -> str:
    """A component's config with every default filled in and file metadata dropped, as one string: a diffusers
    folder saved by one library version and a sidecar written by another compare equal when the models do."""
    model = _DIFFUSERS_CONFIGS.get(sub)
    if model is not None:
        signature = inspect.signature(model.__init__).parameters
        defaults = {k: p.default for k, p in signature.items() if p.default is not inspect.Parameter.empty}
        full = {**defaults, **{k: v for k, v in data.items() if k in defaults}}
    else:
        full = CLIPTextConfig(**data).to_dict()
    kept = {k: v for k, v in full.items() if not k.startswith("_") and k not in _CONFIG_METADATA}
    return f"{sub}: {json.dumps(kept, sort_keys=True, default=str)}"


def architecture_of(config_dir: Path | None) -> str | None:
    """The model configs of a config tree (UNet, VAE, text encoders) as one string: two checkpoints with equal
    architectures can share modules. Contents are compared, not paths: sidecar trees are per file, and a diffusers
    folder is its own tree."""
    if config_dir is None:
        return None
    parts = []
    for sub in _FOLDER_PARTS:
        config = config_dir / sub / "config.json"
        if config.is_file():
            parts.append(_normalized_config(sub, json.loads(config.read_text())))
    return "\n".join(parts) if parts else str(config_dir)


def _copy_plan(loaded: LoadedCheckpoint, weights: CheckpointWeights) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs for every persistent tensor of the resident modules, or ``ArchitectureMismatch``
    before anything is touched."""
    if loaded.is_sdxl != weights.is_sdxl or architecture_of(loaded.config_dir) != weights.architecture:
        raise ArchitectureMismatch(f"{loaded.name}: another family or config")
    modules = _module_parts(loaded)
    if set(modules) != set(weights.components):
        raise ArchitectureMismatch(f"{loaded.name}: other components")
    plan: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name, module in modules.items():
        source = weights.components[name]
        if name.startswith("text_encoder"):
            token_key = next((k for k in source if k.endswith("embeddings.token_embedding.weight")), None)
            if token_key is not None:
                _restore_token_rows(module, int(source[token_key].shape[0]))
        for key, dest in module.state_dict(keep_vars=True).items():
            src = source.get(key)
            if src is None:
                src = source.get("text_model." + key)
            if src is None or src.shape != dest.shape:
                raise ArchitectureMismatch(f"{loaded.name}: {name}.{key} is missing or has another shape")
            plan.append((dest, src))
    return plan


@torch.no_grad()
def copy_into(loaded: LoadedCheckpoint, weights: CheckpointWeights) -> None:
    """Overwrite the resident modules' tensors with ``weights`` in place (cast on the way; no new allocation), or
    raise ``ArchitectureMismatch`` leaving them untouched."""
    plan = _copy_plan(loaded, weights)
    for dest, src in plan:
        dest.copy_(src, non_blocking=True)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def switch_in_place(
    donor: LoadedCheckpoint,
    entry: ModelEntry,
    weights: CheckpointWeights,
    templates: TokenizerTemplates | None = None,
) -> LoadedCheckpoint:
    """``entry`` in ``donor``'s modules: the weights copied in place, a new pipe object around the same modules
    with the new checkpoint's scheduler and fresh tokenizers. ``donor`` must not be used afterwards."""
    copy_into(donor, weights)
    pipe = _assemble_pipeline(
        weights.config_dir, weights.is_sdxl, _module_parts(donor), weights.v_prediction, templates
    )
    return _wrap(entry, pipe, donor.device, donor.dtype, weights.config_dir)


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
    checkpoint_loads: int = 0  # checkpoints made resident (from the RAM tier or the disk)
    checkpoint_hits: int = 0  # requests served by resident modules (device tier)
    ram_hits: int = 0  # checkpoints made resident from the RAM tier (no file read)
    disk_reads: int = 0  # checkpoint files read (task path and prefetch)
    in_place: int = 0  # switches that copied into a resident model's modules instead of allocating new ones
    prefetches: int = 0  # files read ahead into the RAM tier
    vae_loads: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass
class _Slot:
    key: tuple[str, float, int]
    value: LoadedCheckpoint


FileKey = tuple[str, float, int]


def _file_key(entry: ModelEntry) -> FileKey:
    """Which version of a checkpoint: a file's (path, mtime, size); a folder's newest file time, since replacing a
    file inside a folder leaves the folder's own mtime as it was."""
    if entry.path.is_dir():
        times = [f.stat().st_mtime for f in entry.path.rglob("*") if f.is_file()]
        return (str(entry.path), max([entry.mtime, *times]), entry.size)
    return (str(entry.path), entry.mtime, entry.size)


class RamTier:
    """Recently used checkpoints (single files converted, diffusers folders as stored) as CPU state dicts
    (``CheckpointWeights``, the files' dtype; pinned when the device is CUDA), least recently used evicted beyond
    ``budget_bytes``. ``prefetch`` reads a checkpoint in a background thread; ``take`` waits for such a read instead
    of starting a second one."""

    def __init__(self, budget_bytes: int, pin: bool = False) -> None:
        self.budget_bytes = budget_bytes
        self.pin = pin
        self._lock = threading.Lock()
        self._items: OrderedDict[FileKey, CheckpointWeights] = OrderedDict()
        self._inflight: dict[FileKey, Future[CheckpointWeights | None]] = {}
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self.reads = 0

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(w.nbytes for w in self._items.values())

    def __contains__(self, key: FileKey) -> bool:
        with self._lock:
            return key in self._items or key in self._inflight

    def fits(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` may fit (a folder's size counts every file in it: an upper bound)."""
        return 0 < entry.size <= self.budget_bytes

    def take(self, key: FileKey) -> CheckpointWeights | None:
        """The weights if held (or being read ahead: waits for that read); None otherwise."""
        with self._lock:
            pending = self._inflight.get(key)
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        if pending is None:
            return None
        try:
            return pending.result()
        except Exception:  # the task path reads the file itself and reports the error
            return None

    def put(self, key: FileKey, weights: CheckpointWeights) -> CheckpointWeights:
        """Keep ``weights`` when they fit the budget (evicting the least recently used); the weights to use (their
        pinned copy on CUDA)."""
        size = weights.nbytes
        if size > self.budget_bytes:
            return weights
        with self._lock:
            self._items.pop(key, None)
            while self._items and sum(w.nbytes for w in self._items.values()) + size > self.budget_bytes:
                self._items.popitem(last=False)
        kept = weights.pinned() if self.pin else weights
        with self._lock:
            self._items[key] = kept
        return kept

    def unshare(self, key: FileKey, loaded: LoadedCheckpoint) -> None:
        """Replace the held weights of ``key`` by a copy if they share memory with ``loaded``'s modules."""
        with self._lock:
            held = self._items.get(key)
        if held is None:
            return
        used = {
            t.untyped_storage().data_ptr()
            for m in _module_parts(loaded).values()
            for t in m.state_dict().values()
            if t.device.type == "cpu"
        }
        shared = any(t.untyped_storage().data_ptr() in used for part in held.components.values() for t in part.values())
        if shared:
            copied = {name: {k: t.clone() for k, t in part.items()} for name, part in held.components.items()}
            with self._lock:
                self._items[key] = CheckpointWeights(copied, held.is_sdxl, held.v_prediction, held.config_dir)

    def prefetch(self, entry: ModelEntry, on_read: Callable[[], None] | None = None) -> bool:
        """Start reading ``entry`` into the tier unless it is there, being read, or too big; True if started."""
        key = _file_key(entry)
        if not self.fits(entry):
            return False
        with self._lock:
            if key in self._items or key in self._inflight:
                return False
            self._inflight[key] = self._reader.submit(self._read_ahead, entry, key, on_read)
        return True

    def _read_ahead(
        self, entry: ModelEntry, key: FileKey, on_read: Callable[[], None] | None
    ) -> CheckpointWeights | None:
        try:
            start = time.perf_counter()
            weights = self.put(key, read_checkpoint_weights(entry))
            self.reads += 1
            if on_read is not None:
                on_read()
            log.info("checkpoint %s read ahead into RAM in %.2f s", entry.sd_name, time.perf_counter() - start)
            return weights
        except NotCopyable as exc:
            log.info("not reading %s ahead: %s", entry.sd_name, exc)
            return None
        except Exception:
            log.warning("could not read %s ahead; the task will read it", entry.sd_name, exc_info=True)
            return None
        finally:
            with self._lock:
                self._inflight.pop(key, None)

    def wait(self) -> None:
        """Until no read ahead is running (tests, shutdown)."""
        with self._lock:
            pending = list(self._inflight.values())
        for future in pending:
            future.exception()

    def clear(self) -> None:
        self.wait()
        with self._lock:
            self._items.clear()


class ModelCache:
    """Thread-safe LRU of loaded checkpoints bounded by ``budget_bytes`` (the device tier; always keeps the newest
    one) over a RAM tier of converted weights (``ram_budget_bytes``), plus a small LRU of VAE overrides.

    Loads run under the lock, one at a time. A switch never holds two models unless the budget allows it: when the
    new checkpoint does not fit beside the resident ones, a resident model of the same architecture lends its
    modules (the new weights are copied into their storage, no allocation) or the least recently used models are
    released before the new one is built. ``on_release`` is told about every checkpoint that leaves the device
    tier (the executor detaches its adapters)."""

    def __init__(
        self,
        settings_or_budget: Settings | int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        max_vaes: int = 2,
        *,
        ram_budget_bytes: int | None = None,
        on_release: Callable[[LoadedCheckpoint], None] | None = None,
    ) -> None:
        if isinstance(settings_or_budget, Settings):
            self.budget_bytes = settings_or_budget.checkpoint_cache_bytes
            ram_budget = settings_or_budget.checkpoint_ram_cache_bytes
            default_device = settings_or_budget.device
            default_dtype: str = settings_or_budget.dtype
        else:
            self.budget_bytes = int(settings_or_budget)
            ram_budget = 0
            default_device = default_dtype = "auto"
        self.device = pick_device(str(device) if device is not None else default_device)
        self.dtype = dtype if dtype is not None else pick_dtype(self.device, default_dtype)
        self.max_vaes = max_vaes
        self.stats = CacheStats()
        self.ram = RamTier(ram_budget if ram_budget_bytes is None else ram_budget_bytes, self.device.type == "cuda")
        self.tokenizers = TokenizerTemplates()
        self.on_release = on_release
        self._lock = threading.RLock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._vaes: OrderedDict[tuple[Any, ...], AutoencoderKL] = OrderedDict()

    _key = staticmethod(_file_key)

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(s.value.approx_bytes for s in self._slots.values())

    def loaded_names(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return [s.value.name for s in self._slots.values()]

    def report(self) -> ModelCacheReport:
        s = self.stats
        return ModelCacheReport(
            hits={"device": s.checkpoint_hits, "ram": s.ram_hits, "disk": s.checkpoint_loads - s.ram_hits},
            bytes={"device": self.loaded_bytes, "ram": self.ram.held_bytes},
            load_seconds=s.load_seconds,
        )

    def resident(self, entry: ModelEntry) -> bool:
        with self._lock:
            slot = self._slots.get(str(entry.path))
            return slot is not None and slot.key == self._key(entry)

    def prefetch(self, entry: ModelEntry) -> bool:
        """Read ``entry`` into the RAM tier in the background (a queued task will need it); False when it is
        resident, held or being read already, or does not fit the RAM tier."""
        if entry.kind != "checkpoint" or self.resident(entry):
            return False
        started = self.ram.prefetch(entry, self._count_prefetch)
        return started

    def _count_prefetch(self) -> None:
        self.stats.prefetches += 1
        self.stats.disk_reads += 1

    def get(self, entry: ModelEntry) -> LoadedCheckpoint:
        path = str(entry.path)
        with self._lock:
            slot = self._slots.get(path)
            if slot is not None and slot.key == self._key(entry):
                self._slots.move_to_end(path)
                self.stats.checkpoint_hits += 1
                return slot.value
            if slot is not None:  # the file changed on disk
                self._release(path)
            start = time.perf_counter()
            loaded, tier, how = self._make_resident(entry)
            seconds = time.perf_counter() - start
            self.stats.checkpoint_loads += 1
            self.stats.load_seconds += seconds
            log.info(
                "model %s loaded in %.2f s (tier %s, %s)", entry.sd_name, seconds, tier, how,
                extra={"model_kind": "checkpoint", "model": entry.sd_name, "load_seconds": round(seconds, 3),
                       "tier": tier},
            )  # fmt: skip
            self._slots[path] = _Slot(self._key(entry), loaded)
            self._shrink(self.budget_bytes, keep=path)
            return loaded

    def _make_resident(self, entry: ModelEntry) -> tuple[LoadedCheckpoint, str, str]:
        """The checkpoint in device modules: (loaded, tier it came from, how it was placed)."""
        folder = entry.path.is_dir()
        key = self._key(entry)
        weights = self.ram.take(key)
        tier = "ram" if weights is not None else "disk"
        sd: StateDict | None = None
        if weights is not None:
            self.stats.ram_hits += 1
        elif folder:
            weights = self._read_folder(entry, key)
        else:
            sd = _read_single_file(entry)
            self.stats.disk_reads += 1
            weights = self.ram.put(key, convert_checkpoint(sd, entry))
        need = _module_bytes_for(weights, self.dtype) if weights is not None else entry.size
        donor = self._donor(weights, need) if weights is not None else None
        if donor is not None and weights is not None:
            old = self._slots[donor].value
            self._release(donor, free=False)
            try:
                loaded = switch_in_place(old, entry, weights, self.tokenizers)
                self.stats.in_place += 1
                return loaded, tier, f"copied into {old.name}'s modules"
            except ArchitectureMismatch:
                pass  # left untouched; released above, so its memory goes before the new modules come
            del old
        self._shrink(self.budget_bytes - need, force_free=True)
        del weights
        if folder or sd is None:
            self.stats.disk_reads += 1
            tier = "disk"
        if not folder and sd is None:
            sd = _read_single_file(entry)
        loaded = load_checkpoint(entry, self.device, self.dtype, tokenizers=self.tokenizers, state_dict=sd)
        # A file already in the model's dtype and device may lend its tensors to the modules: the RAM tier must
        # then hold a copy, or the next in-place switch into these modules would overwrite it.
        self.ram.unshare(key, loaded)
        return loaded, tier, "new modules"

    def _read_folder(self, entry: ModelEntry, key: FileKey) -> CheckpointWeights | None:
        """A diffusers folder's weights when a resident model could take them in place or the RAM tier may keep
        them; None otherwise (``from_pretrained`` reads the folder into new modules, and reading it twice would
        be for nothing) or when the folder's layout is one ``from_pretrained`` alone reads."""
        architecture = architecture_of(entry.path)
        crowded = self.loaded_bytes + entry.size > self.budget_bytes  # else no model lends (``_donor``)
        lender = crowded and any(architecture_of(s.value.config_dir) == architecture for s in self._slots.values())
        if not lender and not self.ram.fits(entry):
            return None
        try:
            weights = read_folder_weights(entry)
        except NotCopyable as exc:
            log.info("%s; loading it into new modules", exc)
            return None
        self.stats.disk_reads += 1
        return self.ram.put(key, weights)

    def _donor(self, weights: CheckpointWeights, need: int) -> str | None:
        """The least recently used resident model whose modules can take ``weights``, when the new model does not
        fit beside the resident ones (with room to spare, the old model stays cached instead)."""
        if self.loaded_bytes + need <= self.budget_bytes:
            return None
        architecture = weights.architecture
        for path, slot in self._slots.items():
            loaded = slot.value
            if loaded.is_sdxl == weights.is_sdxl and architecture_of(loaded.config_dir) == architecture:
                return path
        return None

    def get_vae(self, entry: ModelEntry, like: LoadedCheckpoint) -> AutoencoderKL:
        """A VAE override for ``like`` (cached; never the checkpoint's own VAE object, which stays untouched)."""
        config_key = json.dumps(dict(like.vae.config), sort_keys=True, default=str)
        key = (str(entry.path), entry.mtime, entry.size, config_key, str(like.device), str(like.dtype))
        with self._lock:
            vae = self._vaes.get(key)
            if vae is not None:
                self._vaes.move_to_end(key)
                return vae
            vae = logged_load("VAE", entry.sd_name, lambda: load_vae(entry, like=like))
            self.stats.vae_loads += 1
            self._vaes[key] = vae
            while len(self._vaes) > self.max_vaes:
                self._vaes.popitem(last=False)
            return vae

    def clear(self) -> None:
        with self._lock:
            for path in list(self._slots):
                self._release(path, free=False)
            self._vaes.clear()
            self.ram.clear()
            _free_memory()

    def _shrink(self, limit: int, keep: str | None = None, force_free: bool = False) -> None:
        evicted = False
        while self._slots and sum(s.value.approx_bytes for s in self._slots.values()) > limit:
            oldest = next(iter(self._slots))
            if oldest == keep:
                break
            self._release(oldest, free=False)
            evicted = True
        if evicted or force_free:
            _free_memory()

    def _release(self, path: str, free: bool = False) -> None:
        slot = self._slots.pop(path, None)
        self.stats.evictions += 1
        if slot is not None and self.on_release is not None:
            self.on_release(slot.value)
        del slot
        if free:
            _free_memory()


def _module_bytes_for(weights: CheckpointWeights, dtype: torch.dtype) -> int:
    """What ``weights`` take as modules in ``dtype`` (floating tensors cast, others as they are)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(
        t.numel() * (size if t.is_floating_point() else t.element_size())
        for part in weights.components.values()
        for t in part.values()
    )


def _free_memory() -> None:
    gc.collect()
    empty_device_cache()
