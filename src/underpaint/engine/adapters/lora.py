"""LoRAs applied per task on a cached checkpoint, without reloading it (field notes 4).

Formats: kohya/A1111 ``.safetensors`` (``lora_unet_*`` / ``lora_te_*`` for SD 1.5, SGM ``lora_unet_input_blocks_*`` with
``lora_te1_`` / ``lora_te2_`` for SDXL, ``.lora_down`` / ``.lora_up`` / ``.alpha``, LoCon conv layers) and the
diffusers/PEFT layout, read by ``engine.weights`` (pickles, ``.pt`` / ``.bin`` / ``.ckpt``, only with
``torch.load(weights_only=True)``: a pickle that needs more than tensors is refused).

How a task's LoRA set is applied, and why:

* Key names are converted by diffusers (the pipeline class's ``lora_state_dict`` plus its PEFT key conversion), so
  every layout diffusers reads maps to module paths and per-module alphas. The result, ``(down, up, alpha/rank)`` per
  module, is cached per file version in a byte-bounded LRU shared by all pipes: a file is read and converted once
  while it fits.
* The deltas are applied by our own forward hooks, not by peft's layer injection: peft wraps every targeted module
  anew for each adapter, a Python cost of ~0.2-0.3 s per LoRA at the real SD 1.5 shapes, i.e. a large fraction of a
  checkpoint load (``bench/lora_switch_real_shapes.py``). A hook is registered once per module and pipe; it adds
  ``sum(strength * alpha/rank * up(down(x)))`` to the module's output (a LoCon conv's down runs with the base conv's
  stride/padding/dilation, its 1x1 up after). Making a file resident on a pipe is only a ``.to(device, dtype)`` of
  its tensors (a no-op for fp32 files on CPU), so a first use costs about what a switch does.
* Weights are never merged into the checkpoint (merging and unmerging is lossy): with no LoRA active, or a total
  strength of 0, a hook returns nothing and the module's output is byte-identical to a pipe that never had a LoRA.
* Adapters are summed in name order, so a set's output does not depend on the request's order or on what ran before.
* Memory is bounded twice: at most ``max_loaded_per_pipe`` adapters have tensors placed for one pipe (least recently
  used dropped first), and converted files live in the byte-bounded LRU (``max_cached_bytes``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from underpaint.engine.adapters import short_reason
from underpaint.engine.job import JobError
from underpaint.engine.lru import logged_load
from underpaint.engine.weights import UnreadableWeights, read_weights
from underpaint.registry import ModelEntry

MAX_LORAS_PER_TASK = 5
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
LayerKey = tuple[str, str]  # (pipe component, module path inside it)


def adapter_name(entry: ModelEntry) -> str:
    """Stable per file version (path, mtime, size): an edited file is a new adapter."""
    digest = hashlib.sha1(f"{entry.path.resolve()}|{entry.mtime!r}|{entry.size}".encode()).hexdigest()
    return f"lora_{digest[:16]}"


def read_lora_file(path: Path) -> StateDict:
    """Read a LoRA file into a flat ``{key: tensor}`` dict; a clear ``JobError`` for anything unreadable."""
    name = path.name
    try:
        data = read_weights(path).data
    except UnreadableWeights as exc:
        raise JobError(f"LoRA {name} could not be read: {exc.reason}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise JobError(f"LoRA {name} is not a LoRA state dict (expected a flat mapping of tensor names to tensors)")
    if not any("lora" in str(k) for k in data):
        raise JobError(f"LoRA {name} holds no LoRA weights (no key contains 'lora')")
    return {str(k): v for k, v in data.items()}


# ---- base model check ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelHints:
    """What a file's raw keys and shapes tell about the base model it was trained for."""

    sdxl_keys: bool
    sd15_keys: bool
    cross_attention_dim: int | None  # in-features of a cross-attention key/value LoRA: 768 SD 1.5, 2048 SDXL


def base_model_hints(state: StateDict) -> BaseModelHints:
    keys = list(state)
    sdxl_keys = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys) or any(
        k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k or "middle_block" in k)
        for k in keys
    )
    cross = None
    for key, tensor in state.items():
        k = key.replace(".", "_")
        if "attn2" in k and ("to_k" in k or "to_v" in k) and ("lora_down" in k or "lora_A" in k or "down_weight" in k):
            cross = int(tensor.shape[1])
            break
    return BaseModelHints(sdxl_keys, any(k.startswith("lora_te_") for k in keys), cross)


def check_base_model(hints: BaseModelHints, loaded: Any, entry: ModelEntry) -> None:
    """Refuse a LoRA trained for the other base model, from its key names and, failing that, its shapes."""
    checkpoint = getattr(loaded, "name", "the checkpoint")
    want = "SDXL" if loaded.is_sdxl else "SD 1.5"
    if (hints.sdxl_keys and not loaded.is_sdxl) or (hints.sd15_keys and loaded.is_sdxl):
        have = "SDXL" if hints.sdxl_keys else "SD 1.5"
        raise JobError(f"LoRA {entry.sd_name_in_api} is an {have} LoRA; checkpoint {checkpoint} is {want}")
    expected = int(loaded.pipe.unet.config.cross_attention_dim)
    if hints.cross_attention_dim is not None and hints.cross_attention_dim != expected:
        raise JobError(
            f"LoRA {entry.sd_name_in_api} does not fit checkpoint {checkpoint} ({want}): its cross-attention "
            f"width is {hints.cross_attention_dim}, the checkpoint's is {expected}"
        )


# ---- conversion ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPair:
    """One module's LoRA: ``down`` (r, in[, kh, kw]), ``up`` (out, r[, 1, 1]) and ``alpha / rank``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass(frozen=True)
class ConvertedLora:
    layers: dict[LayerKey, LoraPair]
    hints: BaseModelHints
    nbytes: int


def convert_lora(state: StateDict, loaded: Any) -> dict[LayerKey, LoraPair]:
    """Any layout diffusers reads -> ``{(component, module path): LoraPair}``, with diffusers' own key conversion."""
    pipe = loaded.pipe
    # The SDXL loader passes the UNet config to remap SGM block numbers; the conversion mutates the dict it gets.
    kwargs = {"unet_config": pipe.unet.config} if loaded.is_sdxl else {}
    converted, alphas = type(pipe).lora_state_dict(dict(state), **kwargs)
    components: list[str] = list(getattr(pipe, "_lora_loadable_modules", ["unet", "text_encoder"]))
    layers: dict[LayerKey, LoraPair] = {}
    for component in components:
        part = {k.removeprefix(f"{component}."): v for k, v in converted.items() if k.startswith(f"{component}.")}
        if not part:
            continue
        peft_keys = component == "unet" and any("lora_A" in k for k in part)
        module_alphas = {
            k.removesuffix(_LORA_A): float(v)
            for k, v in _to_peft(_alphas_by_down_key(alphas, component, part), component, peft_keys).items()
        }
        part = _to_peft(part, component, peft_keys)
        unsupported = sorted(k for k in part if not k.endswith((_LORA_A, _LORA_B)))
        if unsupported:
            # DoRA magnitudes, LoRA biases, LoKr factors: not plain low-rank pairs.
            raise ValueError(f"unsupported LoRA tensors (only plain down/up pairs are): {', '.join(unsupported[:3])}")
        for key, down in part.items():
            if not key.endswith(_LORA_A):
                continue
            module = key.removesuffix(_LORA_A)
            up = part.get(module + _LORA_B)
            if up is None:
                raise ValueError(f"{component}.{module} has a down weight without an up weight")
            alpha = module_alphas.get(module)
            # No alpha in the file means alpha = rank (scale 1), as in A1111 and diffusers.
            layers[(component, module)] = LoraPair(down, up, 1.0 if alpha is None else alpha / int(down.shape[0]))
    return layers


def _to_peft(part: StateDict, component: str, already_peft: bool) -> StateDict:
    """diffusers' key conversion to ``<module>.lora_A/lora_B.weight``, as its UNet / text-encoder loaders do it."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if not part or already_peft:
        return part
    if component == "unet":
        return dict(convert_unet_state_dict_to_peft(part))
    return dict(convert_state_dict_to_peft(convert_state_dict_to_diffusers(part)))


def _alphas_by_down_key(alphas: dict[str, float] | None, component: str, part: StateDict) -> StateDict:
    """kohya alphas re-keyed as the down weight they belong to, so the same key conversion maps them to modules."""
    out: StateDict = {}
    for key, value in (alphas or {}).items():
        if not key.startswith(f"{component}."):
            continue
        stem = key.removeprefix(f"{component}.").removesuffix(".alpha")
        for down in (stem, f"{stem}.lora.down.weight", f"{stem}.lora_linear_layer.down.weight"):
            if down in part:
                out[down] = torch.tensor(float(value))
                break
    return out


class _FileCache:
    """Byte-bounded LRU of converted LoRA files, keyed by file version and conversion variant."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], ConvertedLora] = OrderedDict()
        self.disk_reads = 0
        self.conversions = 0

    @property
    def total_bytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())

    def get(self, entry: ModelEntry, loaded: Any) -> ConvertedLora:
        """The converted file, after checking it fits ``loaded``'s base model."""
        # SDXL conversion depends on the UNet layout (SGM block numbering), SD 1.5 conversion on nothing.
        variant = f"sdxl:{loaded.pipe.unet.config.layers_per_block}" if loaded.is_sdxl else "sd15"
        key = (adapter_name(entry), variant)
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            check_base_model(item.hints, loaded, entry)
            return item
        item = logged_load("LoRA", entry.sd_name, lambda: self._load(entry, loaded))
        if item.nbytes <= self.max_bytes:
            self._items[key] = item
            while self.total_bytes > self.max_bytes:
                self._items.popitem(last=False)
        return item

    def _load(self, entry: ModelEntry, loaded: Any) -> ConvertedLora:
        """The file read, checked against ``loaded``'s base model and converted to its layers."""
        state = read_lora_file(entry.path)
        self.disk_reads += 1
        hints = base_model_hints(state)
        check_base_model(hints, loaded, entry)
        try:
            layers = convert_lora(state, loaded)
        except Exception as exc:  # diffusers raises ValueError/KeyError for layouts it cannot map
            checkpoint = getattr(loaded, "name", "the checkpoint")
            raise JobError(
                f"LoRA {entry.sd_name_in_api} could not be applied to checkpoint {checkpoint}: {short_reason(exc)}"
            ) from exc
        self.conversions += 1
        nbytes = sum(t.numel() * t.element_size() for p in layers.values() for t in (p.down, p.up))
        return ConvertedLora(layers, hints, nbytes)


# ---- application --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Placed:
    """A LoRA pair on its module's device and dtype, shaped for the module's kind."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


@dataclass(frozen=True)
class _Term:
    adapter: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float  # strength * alpha / rank


class _LoraHook:
    """Forward hook on one Linear/Conv2d: adds the active terms; with none, leaves the output untouched."""

    def __init__(self, module: nn.Module) -> None:
        self.terms: tuple[_Term, ...] = ()
        self.handle: RemovableHandle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        terms = self.terms  # replaced whole by activate, never mutated: a forward sees one consistent set
        if not terms:
            return None
        x = args[0]
        for term in terms:
            if isinstance(module, nn.Conv2d):
                hidden = F.conv2d(x, term.down, None, module.stride, module.padding, module.dilation)
                output = output + F.conv2d(hidden, term.up) * term.scale
            else:
                output = output + F.linear(F.linear(x, term.down), term.up) * term.scale
        return output


def _resolve(pipe: Any, component: str, path: str) -> nn.Module | None:
    root = getattr(pipe, component, None)
    if not isinstance(root, nn.Module):
        return None
    # transformers 5 flattened CLIPTextModel; older LoRA files still name ``text_model.``.
    for candidate in (path, path.removeprefix("text_model.")):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _place(module: nn.Module, pair: LoraPair) -> _Placed:
    """Check ``pair`` fits ``module`` and move it to the module's device/dtype; ValueError says why not."""
    if not isinstance(module, nn.Conv2d | nn.Linear):
        raise ValueError(f"a {type(module).__name__} layer, not a Linear or Conv2d")
    weight: torch.Tensor = module.weight
    down, up = pair.down, pair.up
    if isinstance(module, nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"grouped or non-zero-padded conv {tuple(weight.shape)}")
        if down.dim() == 2 and module.kernel_size == (1, 1):  # linear-shaped LoRA on a 1x1 conv
            down, up = down[:, :, None, None], up[:, :, None, None]
        ok = down.dim() == 4 and down.shape[1:] == weight.shape[1:] and up.shape[2:] == (1, 1)
    else:
        if down.dim() == 4 and down.shape[2:] == (1, 1):  # 1x1-conv-shaped LoRA on a linear layer
            down, up = down.flatten(1), up.flatten(1)
        ok = down.dim() == 2 and down.shape[1] == weight.shape[1]
    if not (ok and up.shape[0] == weight.shape[0] and up.shape[1] == down.shape[0]):
        raise ValueError(
            f"shapes down {tuple(pair.down.shape)} / up {tuple(pair.up.shape)} vs layer {tuple(weight.shape)}"
        )
    return _Placed(down.to(weight.device, weight.dtype), up.to(weight.device, weight.dtype), pair.scale)


@dataclass
class _PipeState:
    """What one pipe holds: resident adapters (least recently used first) and the hooks on its modules."""

    adapters: OrderedDict[str, dict[nn.Module, _Placed]] = field(default_factory=OrderedDict)
    hooks: dict[nn.Module, _LoraHook] = field(default_factory=dict)
    paths: dict[nn.Module, LayerKey] = field(default_factory=dict)
    active: tuple[tuple[str, float], ...] | None = None  # what the hooks were last given; None = rebuild


class LoraManager:
    """One per process. Applies a task's LoRA set to a loaded checkpoint's pipe; see the module docstring."""

    def __init__(self, max_loaded_per_pipe: int = 8, max_cached_bytes: int = 512 * 1024 * 1024) -> None:
        if max_loaded_per_pipe < MAX_LORAS_PER_TASK:
            raise ValueError(f"max_loaded_per_pipe must be >= {MAX_LORAS_PER_TASK} (the per-task maximum)")
        self.max_loaded_per_pipe = max_loaded_per_pipe
        self._files = _FileCache(max_cached_bytes)
        self._pipes: weakref.WeakKeyDictionary[Any, _PipeState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.adapter_loads = 0  # adapters made resident on a pipe

    @property
    def disk_reads(self) -> int:
        return self._files.disk_reads

    @property
    def conversions(self) -> int:
        return self._files.conversions

    @property
    def cached_bytes(self) -> int:
        return self._files.total_bytes

    def loaded_adapters(self, loaded: Any) -> list[str]:
        """Names of the adapters resident on this checkpoint's pipe, least recently used first."""
        with self._lock:
            state = self._pipes.get(loaded.pipe)
            return list(state.adapters) if state else []

    def hooked_layers(self, loaded: Any) -> list[LayerKey]:
        """``(component, module path)`` of every layer of this pipe that carries a LoRA hook."""
        with self._lock:
            state = self._pipes.get(loaded.pipe)
            return sorted(state.paths.values()) if state else []

    def active_adapters(self, loaded: Any) -> set[str]:
        """Adapters whose deltas the pipe's forward passes add right now (read from the hooks themselves)."""
        with self._lock:
            state = self._pipes.get(loaded.pipe)
            return {t.adapter for hook in state.hooks.values() for t in hook.terms} if state else set()

    def activate(self, loaded: Any, loras: Sequence[tuple[ModelEntry, float]]) -> None:
        """Make exactly ``loras`` (entry, strength) active on ``loaded.pipe`` for the next generation."""
        if len(loras) > MAX_LORAS_PER_TASK:
            raise JobError(f"at most {MAX_LORAS_PER_TASK} LoRAs per task, got {len(loras)}")
        weights: dict[str, float] = {}
        entries: dict[str, ModelEntry] = {}
        for entry, strength in loras:
            name = adapter_name(entry)
            # The same file listed twice stacks, as two identical <lora:...> tags do in A1111.
            weights[name] = weights.get(name, 0.0) + float(strength)
            entries[name] = entry
        with self._lock:
            state = self._pipes.get(loaded.pipe)
            if state is None:
                state = self._pipes[loaded.pipe] = _PipeState()
            for name, entry in entries.items():
                if name not in state.adapters:
                    self._evict_for(state, keep=set(entries))
                    self._load(loaded, state, name, entry)
                state.adapters.move_to_end(name)
            # Name order fixes the summation order; weight 0 is left out so it is byte-identical to no LoRA.
            active = tuple(sorted((n, w) for n, w in weights.items() if w != 0.0))
            if active != state.active:
                _set_terms(state, active)
                state.active = active

    def forget(self, loaded: Any) -> None:
        """Remove this checkpoint's hooks and resident adapters (it is leaving the cache)."""
        with self._lock:
            state = self._pipes.pop(loaded.pipe, None)
            for hook in state.hooks.values() if state else ():
                hook.handle.remove()

    def _evict_for(self, state: _PipeState, keep: set[str]) -> None:
        while len(state.adapters) >= self.max_loaded_per_pipe:
            victim = next((n for n in state.adapters if n not in keep), None)
            if victim is None:
                return
            del state.adapters[victim]
            state.active = None  # the hooks may still hold its tensors

    def _load(self, loaded: Any, state: _PipeState, name: str, entry: ModelEntry) -> None:
        lora = self._files.get(entry, loaded)
        checkpoint = getattr(loaded, "name", "the checkpoint")
        placed: dict[nn.Module, _Placed] = {}
        paths: dict[nn.Module, LayerKey] = {}
        for (component, path), pair in lora.layers.items():
            module = _resolve(loaded.pipe, component, path)
            if module is None:
                continue
            try:
                placed[module] = _place(module, pair)
            except ValueError as exc:
                raise JobError(
                    f"LoRA {entry.sd_name_in_api} could not be applied to checkpoint {checkpoint}: "
                    f"{component}.{path}: {exc}"
                ) from exc
            paths[module] = (component, path)
        if not placed:
            raise JobError(f"LoRA {entry.sd_name_in_api} matched no layer of checkpoint {checkpoint}")
        if len(placed) < len(lora.layers):
            logger.warning(
                "LoRA %s: %d of %d layers have no match in checkpoint %s and are ignored",
                entry.sd_name_in_api, len(lora.layers) - len(placed), len(lora.layers), checkpoint,
            )  # fmt: skip
        for module in placed:  # only once every layer fitted: a refused file leaves no hook behind
            if module not in state.hooks:
                state.hooks[module] = _LoraHook(module)
                state.paths[module] = paths[module]
        state.adapters[name] = placed
        self.adapter_loads += 1


def _set_terms(state: _PipeState, active: tuple[tuple[str, float], ...]) -> None:
    terms: dict[nn.Module, list[_Term]] = {}
    for name, weight in active:
        for module, p in state.adapters[name].items():
            terms.setdefault(module, []).append(_Term(name, p.down, p.up, weight * p.scale))
    for module, hook in state.hooks.items():
        hook.terms = tuple(terms.get(module, ()))
