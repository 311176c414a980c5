"""ControlNet units: load the models, prepare the control maps, and add their residuals to each UNet call.

A1111 semantics: unit ``strength`` is the conditioning scale (default 1.0; diffusers' img2img pipelines default to
0.8, which we never use), a unit acts while ``guidance_start <= progress <= guidance_end`` of the sampling steps,
the control map goes to both halves of the CFG batch, and several units add their residuals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from underpaint.engine import preprocessors
from underpaint.engine.job import ControlNetUnitSpec, JobError
from underpaint.engine.lru import LoadedLru, logged_load
from underpaint.engine.weights import ModelLoadError, load_state_dict_file
from underpaint.registry import ModelEntry

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
CONTROL_PREFIX = "control_model."
StateDict = dict[str, torch.Tensor]


def _config_dir(entry: ModelEntry) -> Path:
    side = entry.sidecar_config
    if side is not None:
        return side
    return CONFIG_ROOT / ("controlnet_sdxl" if entry.is_sdxl else "controlnet_sd15")


def _ldm_to_diffusers(sd: StateDict, config: dict[str, Any]) -> StateDict:
    """lllyasviel/A1111 layout (``control_model.*`` or unprefixed) -> diffusers ``ControlNetModel`` names."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if "time_embedding.linear_1.weight" in sd:  # already diffusers names (e.g. diffusers_xl_*.safetensors)
        return sd
    inner = {k[len(CONTROL_PREFIX) :]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)} or sd
    converted = {k: v for k, v in convert_controlnet_checkpoint(inner, config).items() if v is not None}
    # diffusers 0.42's converter drops SDXL's label_emb (the text_time embedding): map it here.
    for ldm, ours in (("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")):
        for leaf in ("weight", "bias"):
            if ldm + leaf in inner:
                converted[ours + leaf] = inner[ldm + leaf]
    return converted


def _load_single_file(entry: ModelEntry, dtype: torch.dtype) -> Any:
    from accelerate import init_empty_weights
    from diffusers.models.controlnets.controlnet import ControlNetModel

    config_dir = _config_dir(entry)
    config = dict(ControlNetModel.load_config(str(config_dir)))
    try:
        sd = _ldm_to_diffusers(load_state_dict_file(entry.path), config)
    except ModelLoadError as exc:
        raise JobError(f"ControlNet {entry.sd_name!r} could not be loaded: {exc}") from exc
    with init_empty_weights():
        model = ControlNetModel.from_config(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise JobError(
            f"ControlNet {entry.sd_name!r} does not fit the {'SDXL' if entry.is_sdxl else 'SD 1.5'} ControlNet config "
            f"{config_dir}: {len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); a sidecar {entry.stem}.config/config.json next to the file overrides the config"
        )
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:  # shape mismatches
        raise JobError(f"ControlNet {entry.sd_name!r} does not fit the config {config_dir}: {exc}") from exc
    return model.to(dtype)


def load_controlnet_model(entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> Any:
    """A diffusers folder (``from_pretrained``) or a single file (.safetensors/.pth/.ckpt, lllyasviel or diffusers
    key layout) with its sidecar config or the shipped SD 1.5 / SDXL one."""
    from diffusers.models.controlnets.controlnet import ControlNetModel

    if entry.path.is_dir():
        # Folders downloaded with only the fp16 weights carry them as the "fp16" variant.
        plain = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
        fp16_only = not any((entry.path / f).is_file() for f in plain) and any(entry.path.glob("*.fp16.*"))
        try:
            model = ControlNetModel.from_pretrained(
                entry.path, local_files_only=True, torch_dtype=dtype, variant="fp16" if fp16_only else None
            )
        except Exception as exc:  # diffusers raises many types for broken folders
            raise JobError(f"ControlNet {entry.sd_name!r} could not be loaded: {exc}") from exc
    else:
        model = _load_single_file(entry, dtype)
    return model.to(device).eval()


class ControlNetCache:
    """Loaded ControlNets, least recently used evicted beyond ``capacity`` (they are 0.7-2.5 GB each)."""

    def __init__(self, capacity: int = 3) -> None:
        self._lru: LoadedLru[tuple[Path, float, str], Any] = LoadedLru(capacity)

    @property
    def loads(self) -> int:
        return self._lru.loads

    def get(self, entry: ModelEntry, device: torch.device, dtype: torch.dtype) -> Any:
        key = (entry.path, entry.mtime, str(dtype))
        return self._lru.get(
            key, lambda: logged_load("ControlNet", entry.sd_name, lambda: load_controlnet_model(entry, device, dtype))
        )

    def clear(self) -> None:
        self._lru.clear()


@dataclass
class PreparedUnit:
    model: Any
    image: torch.Tensor  # [1, 3, H, W] in [0, 1]
    scale: float
    start: float
    end: float


def control_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).to(device, dtype)


class ControlHookImpl:
    def __init__(self, units: list[PreparedUnit]) -> None:
        self.units = units

    def __call__(
        self,
        x_in: torch.Tensor,
        t: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, Any] | None,
        step_fraction: float,
    ) -> dict[str, Any]:
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit in self.units:
            if not unit.start <= step_fraction <= unit.end:
                continue
            cond = _at_size(unit.image, x_in.shape[-2] * 8, x_in.shape[-1] * 8).expand(x_in.shape[0], -1, -1, -1)
            d, m = unit.model(
                x_in.to(unit.image.dtype),
                t,
                encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=cond,
                conditioning_scale=unit.scale,
                added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )
            if down is None:
                down, mid = list(d), m
            else:
                down = [a + b for a, b in zip(down, d, strict=True)]
                mid = mid + m if mid is not None else m
        if down is None:
            return {}
        return {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


def _at_size(control: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The control map at the latents' pixel size: the hires fix's second pass runs larger than the first, so its
    map is the first pass's, resized (bilinear)."""
    if tuple(control.shape[-2:]) == (height, width):
        return control
    return torch.nn.functional.interpolate(control, size=(height, width), mode="bilinear", antialias=False)


def build_control_hook(
    loaded: Any,
    units: list[tuple[ModelEntry, ControlNetUnitSpec]],
    width: int,
    height: int,
    annotator_dir: Path,
    device: torch.device,
    seed: int = 0,
    annotator_nets: preprocessors.AnnotatorCache | None = None,
    controlnets: ControlNetCache | None = None,
) -> ControlHookImpl | None:
    """The hook adding the residuals of ``units`` to each UNet call, or None when no unit contributes.
    ``controlnets``: the loaded models to reuse (the executor's; a new cache when None).

    Raises ``JobError`` for a ControlNet of the other base model, a missing annotator file, an unloadable model.
    """
    dtype = loaded.dtype
    for entry, spec in units:  # every refusal before any model loads or preprocessor runs
        if entry.is_sdxl != loaded.is_sdxl:
            base = "SDXL" if loaded.is_sdxl else "SD 1.5"
            raise JobError(f"ControlNet {entry.stem!r} is for {entry.base_model}, the checkpoint is {base}")
        preprocessors.check_files(spec.preprocessor, annotator_dir)
    nets = annotator_nets if annotator_nets is not None else preprocessors.AnnotatorCache()
    models = controlnets if controlnets is not None else ControlNetCache()
    prepared: list[PreparedUnit] = []
    for entry, spec in units:
        if spec.strength == 0:
            continue  # a unit at strength 0 contributes nothing: skip its model entirely
        image = spec.image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        ctx = preprocessors.Context(annotator_dir=annotator_dir, seed=seed, device=device, nets=nets)
        control_map = preprocessors.run_preprocessor(spec.preprocessor, image, ctx)
        prepared.append(
            PreparedUnit(
                model=models.get(entry, device, dtype),
                image=control_tensor(control_map, device, dtype),
                scale=float(spec.strength),
                start=float(spec.guidance_start),
                end=float(spec.guidance_end),
            )
        )
    return ControlHookImpl(prepared) if prepared else None
