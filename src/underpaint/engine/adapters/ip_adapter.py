"""IP-Adapter (field notes 7): ``ip-adapter_sd15.bin`` / ``ip-adapter_sdxl.bin`` (or ``.safetensors``) on the UNet.

Layout of ``M/ipadapter/``::

    ip-adapter_sd15.bin                       torch.save({"image_proj": {...}, "ip_adapter": {...}})
    ip-adapter_sdxl.safetensors               or flattened "image_proj.*" / "ip_adapter.*" keys
    image_encoders/<adapter stem>/            optional, this adapter's own encoder (wins)
    image_encoders/sd15/                      shared encoder for SD 1.5 adapters (real: OpenCLIP ViT-H/14)
    image_encoders/sdxl/                      shared encoder for SDXL adapters (real: ViT-bigG/14 for ip-adapter_sdxl,
                                              ViT-H/14 for the *_vit-h variants: give those their own folder)

An encoder folder is a ``CLIPVisionModelWithProjection.save_pretrained`` folder (``config.json`` + weights), e.g. the
``image_encoder`` folder of the h94/IP-Adapter repository. The ``image_encoders`` folder has no ``config.json`` of its
own, so the registry does not list it as a model.

Per task: the adapter is loaded into the UNet (kept while the next tasks use the same one), its scale set to the
request's strength, and the reference image encoded here; ``activate`` returns the UNet's ``added_cond_kwargs``
contribution. Without an adapter the UNet's processors are restored (``unload_ip_adapter``), which gives output
byte-identical to a pipe that never had one. Encoders and adapter files are kept in small LRU caches.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from underpaint.engine.adapters import short_reason
from underpaint.engine.job import JobError
from underpaint.engine.lru import logged_load
from underpaint.engine.weights import UnreadableWeights, read_weights
from underpaint.registry import ModelEntry
from underpaint.weight_headers import weights_format

IMAGE_ENCODERS_DIR = "image_encoders"

IPState = dict[str, dict[str, torch.Tensor]]


def image_encoder_candidates(entry: ModelEntry, sdxl: bool) -> list[Path]:
    """Where the encoder for ``entry`` is looked up, in order."""
    root = entry.path.parent / IMAGE_ENCODERS_DIR
    return [root / entry.stem, root / ("sdxl" if sdxl else "sd15")]


def read_ip_adapter_file(path: Path) -> IPState:
    label = f"IP-Adapter {path.name}"
    try:
        stored = read_weights(path)
    except UnreadableWeights as exc:
        raise JobError(f"{label} could not be read: {exc.reason}") from exc
    state: Any = stored.data
    if weights_format(path) == "safetensors" and isinstance(stored.data, dict):  # flattened "image_proj.*" names
        state = {"image_proj": {}, "ip_adapter": {}}
        for key, tensor in stored.data.items():
            group, _, rest = key.partition(".")
            if group in state:
                state[group][rest] = tensor
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise JobError(f"{label} is not an IP-Adapter file (needs image_proj and ip_adapter weights)")
    return {"image_proj": dict(state["image_proj"]), "ip_adapter": dict(state["ip_adapter"])}


def check_fits(state: IPState, loaded: Any, entry: ModelEntry) -> None:
    """The adapter's key/value projections must read the checkpoint's cross-attention width."""
    unet = loaded.pipe.unet
    expected = int(unet.config.cross_attention_dim)
    widths = {int(t.shape[1]) for k, t in state["ip_adapter"].items() if k.endswith("to_k_ip.weight")}
    checkpoint = getattr(loaded, "name", "the checkpoint")
    base = "SDXL" if loaded.is_sdxl else "SD 1.5"
    if widths and widths != {expected}:
        raise JobError(
            f"IP-Adapter {entry.sd_name} does not fit checkpoint {checkpoint} ({base}): it was made for "
            f"cross-attention width {sorted(widths)[0]}, the checkpoint has {expected}"
        )
    cross_layers = sum(1 for name in unet.attn_processors if not name.endswith("attn1.processor"))
    have = sum(1 for k in state["ip_adapter"] if k.endswith("to_k_ip.weight"))
    if have != cross_layers:
        raise JobError(
            f"IP-Adapter {entry.sd_name} has {have} cross-attention layers, checkpoint {checkpoint} has {cross_layers}"
        )


class _Encoder:
    def __init__(self, folder: Path) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.folder = folder
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True).eval()
        size = int(self.model.config.image_size)
        self.processor = CLIPImageProcessor(size=size, crop_size=size)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        values: torch.Tensor = self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
        return values


class IPAdapterManager:
    """One per process. Caches at most ``max_encoders`` image encoders and ``max_files`` adapter files."""

    def __init__(self, max_encoders: int = 2, max_files: int = 4) -> None:
        self.max_encoders = max_encoders
        self.max_files = max_files
        self._encoders: OrderedDict[str, _Encoder] = OrderedDict()
        self._files: OrderedDict[tuple[str, float], IPState] = OrderedDict()
        self._active: weakref.WeakKeyDictionary[Any, tuple[str, float]] = weakref.WeakKeyDictionary()
        # The UNet's own attention processors before an adapter replaced them, restored exactly on unload
        # (diffusers' unload installs its default class, which need not be what the checkpoint ran with).
        self._saved: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.adapter_loads = 0

    def forget(self, loaded: Any) -> None:
        with self._lock:
            self._active.pop(loaded.pipe, None)

    def activate(
        self,
        loaded: Any,
        entry: ModelEntry | None,
        image: Image.Image | None,
        scale: float,
        *,
        num_images: int = 1,
        do_classifier_free_guidance: bool = True,
    ) -> dict[str, Any]:
        """Set up ``entry`` on the pipe's UNet and return ``{"image_embeds": [tensor]}`` for ``added_cond_kwargs``
        (and for diffusers pipelines' ``ip_adapter_image_embeds``): batch ordered [uncond x num_images,
        cond x num_images] with CFG, [cond x num_images] without. ``entry=None`` removes any adapter; returns {}."""
        pipe = loaded.pipe
        with self._lock:
            if entry is None:
                if self._active.pop(pipe, None) is not None:
                    self._unload(pipe)
                return {}
            if image is None:
                raise JobError(f"IP-Adapter {entry.sd_name} needs a reference image")
            key = (str(entry.path.resolve()), entry.mtime)
            state = self._file(key, entry)
            check_fits(state, loaded, entry)
            encoder = self._encoder(entry, loaded.is_sdxl)
            self._check_encoder(state, encoder, entry)
            if self._active.get(pipe) != key:
                if self._active.pop(pipe, None) is not None:
                    self._unload(pipe)
                self._load(pipe, state, encoder, entry, loaded)
                self._active[pipe] = key
            pipe.set_ip_adapter_scale(float(scale))
            return {"image_embeds": [self._embeds(pipe, encoder, image, num_images, do_classifier_free_guidance)]}

    def _file(self, key: tuple[str, float], entry: ModelEntry) -> IPState:
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        state = logged_load("IP-Adapter", entry.sd_name, lambda: read_ip_adapter_file(entry.path))
        self._files[key] = state
        while len(self._files) > self.max_files:
            self._files.popitem(last=False)
        return state

    def _encoder(self, entry: ModelEntry, sdxl: bool) -> _Encoder:
        candidates = image_encoder_candidates(entry, sdxl)
        folder = next((c for c in candidates if (c / "config.json").is_file()), None)
        if folder is None:
            wanted = " or ".join(str(c) for c in candidates)
            raise JobError(f"IP-Adapter {entry.sd_name}: image encoder not found; expected a folder at {wanted}")
        cache_key = str(folder.resolve())
        if cache_key in self._encoders:
            self._encoders.move_to_end(cache_key)
            return self._encoders[cache_key]
        try:
            encoder = logged_load("image encoder", folder.name, lambda: _Encoder(folder))
        except Exception as exc:  # transformers raises OSError/ValueError for broken folders
            raise JobError(
                f"IP-Adapter {entry.sd_name}: image encoder {folder} could not be loaded: {short_reason(exc)}"
            ) from exc
        self._encoders[cache_key] = encoder
        while len(self._encoders) > self.max_encoders:
            self._encoders.popitem(last=False)
        return encoder

    @staticmethod
    def _check_encoder(state: IPState, encoder: _Encoder, entry: ModelEntry) -> None:
        proj = state["image_proj"].get("proj.weight")
        if proj is None:
            return  # Plus/Resampler adapters read hidden states, checked by diffusers when loading
        dim = int(encoder.model.config.projection_dim)
        if int(proj.shape[1]) != dim:
            raise JobError(
                f"IP-Adapter {entry.sd_name} expects {int(proj.shape[1])}-dim image embeddings, the image encoder at "
                f"{encoder.folder} gives {dim}"
            )

    def _load(self, pipe: Any, state: IPState, encoder: _Encoder, entry: ModelEntry, loaded: Any) -> None:
        # diffusers consumes the nested dicts; hand it copies so the cached file stays intact.
        copy = {group: dict(part) for group, part in state.items()}
        self._saved[pipe] = dict(pipe.unet.attn_processors)
        try:
            pipe.register_modules(image_encoder=encoder.model)
            pipe.load_ip_adapter(copy, subfolder="", weight_name="", image_encoder_folder=None)
        except Exception as exc:  # shape/key errors from diffusers
            self._unload(pipe)
            checkpoint = getattr(loaded, "name", "the checkpoint")
            raise JobError(
                f"IP-Adapter {entry.sd_name} could not be applied to checkpoint {checkpoint}: {short_reason(exc)}"
            ) from exc
        self.adapter_loads += 1

    def _unload(self, pipe: Any) -> None:
        pipe.unload_ip_adapter()
        saved = self._saved.pop(pipe, None)
        if saved is not None:
            pipe.unet.set_attn_processor(saved)

    @staticmethod
    @torch.no_grad()
    def _embeds(pipe: Any, encoder: _Encoder, image: Image.Image, num_images: int, cfg: bool) -> torch.Tensor:
        from diffusers.models.embeddings import ImageProjection

        unet = pipe.unet
        # The image encoder (ViT-H: 0.6 B parameters) runs on the UNet's device in its dtype, as the UNet does.
        encoder.model.to(device=unet.device, dtype=unet.dtype)
        pixels = encoder.pixels(image).to(device=unet.device, dtype=unet.dtype)
        projection = unet.encoder_hid_proj.image_projection_layers[0]
        if isinstance(projection, ImageProjection):
            cond = encoder.model(pixels).image_embeds
            uncond = torch.zeros_like(cond)
        else:  # Plus-style resamplers take the penultimate hidden states; uncond encodes a black image
            cond = encoder.model(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = encoder.model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        cond = torch.cat([cond[None]] * num_images, dim=0)
        batch = torch.cat([torch.cat([uncond[None]] * num_images, dim=0), cond], dim=0) if cfg else cond
        return batch.to(device=unet.device, dtype=unet.dtype)
