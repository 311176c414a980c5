"""LoRAs applied per task on a cached checkpoint, without reloading it (field notes 4).

Formats: kohya/A1111 ``.safetensors`` (``lora_unet_*`` / ``lora_te_*`` for SD 1.5, SGM ``lora_unet_input_blocks_*`` with
``lora_te1_`` / ``lora_te2_`` for SDXL, ``.lora_down`` / ``.lora_up`` / ``.alpha``, LoCon conv layers) and the
diffusers/PEFT layout; diffusers' ``load_lora_weights`` converts them. ``.pt`` / ``.bin`` / ``.ckpt`` files are read with
``torch.load(weights_only=True)``: a pickle that needs more than tensors is refused.

How a task's LoRA set is applied, and why:

* Every adapter stays loaded (unfused) on the pipe under a name derived from its path and mtime, so switching sets is a
  ``set_adapters`` call and an edited file gets a fresh name. ``fuse_lora`` is never used: fuse/unfuse is lossy.
* A task without LoRAs calls ``disable_lora()``; disabled, weight-0 and deleted adapters are byte-identical to a pipe
  that never had one (field notes 4).
* Memory is bounded twice: at most ``max_loaded_per_pipe`` adapters live on one pipe (least recently used are deleted
  first), and raw state dicts read from disk are kept in a byte-bounded LRU shared by all pipes, so a LoRA used on
  several checkpoints is read from disk once while it fits.
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

from underpaint.engine.adapters import short_reason
from underpaint.engine.job import JobError
from underpaint.engine.registry import ModelEntry

MAX_LORAS_PER_TASK = 5
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


def adapter_name(entry: ModelEntry) -> str:
    """Stable per file version: peft module names must not contain dots, so hash path and mtime."""
    digest = hashlib.sha1(f"{entry.path.resolve()}|{entry.mtime!r}|{entry.size}".encode()).hexdigest()
    return f"lora_{digest[:16]}"


def read_lora_file(path: Path) -> StateDict:
    """Read a LoRA file into a flat ``{key: tensor}`` dict; a clear ``JobError`` for anything unreadable."""
    name = path.name
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        elif path.suffix.lower() in _TORCH_SUFFIXES:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            raise JobError(f"LoRA {name}: unsupported file type {path.suffix!r}")
    except JobError:
        raise
    except Exception as exc:  # safetensors, pickle and OS errors all mean "cannot use this file"
        raise JobError(f"LoRA {name} could not be read: {short_reason(exc)}") from exc
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise JobError(f"LoRA {name} is not a LoRA state dict (expected a flat mapping of tensor names to tensors)")
    if not any("lora" in str(k) for k in data):
        raise JobError(f"LoRA {name} holds no LoRA weights (no key contains 'lora')")
    return {str(k): v for k, v in data.items()}


def _cross_attention_dim(state: StateDict) -> int | None:
    """In-features of a cross-attention key/value LoRA: 768 for SD 1.5, 2048 for SDXL (real models)."""
    for key, tensor in state.items():
        k = key.replace(".", "_")
        if "attn2" in k and ("to_k" in k or "to_v" in k) and ("lora_down" in k or "lora_A" in k or "down_weight" in k):
            return int(tensor.shape[1])
    return None


def check_base_model(state: StateDict, loaded: Any, entry: ModelEntry) -> None:
    """Refuse a LoRA trained for the other base model, from its key names and, failing that, its shapes."""
    keys = list(state)
    sdxl_keys = any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys) or any(
        k.startswith("lora_unet_") and ("input_blocks" in k or "output_blocks" in k or "middle_block" in k)
        for k in keys
    )
    sd15_keys = any(k.startswith("lora_te_") for k in keys)
    checkpoint = getattr(loaded, "name", "the checkpoint")
    want = "SDXL" if loaded.is_sdxl else "SD 1.5"
    if (sdxl_keys and not loaded.is_sdxl) or (sd15_keys and loaded.is_sdxl):
        have = "SDXL" if sdxl_keys else "SD 1.5"
        raise JobError(f"LoRA {entry.sd_name_in_api} is an {have} LoRA; checkpoint {checkpoint} is {want}")
    cross = _cross_attention_dim(state)
    expected = int(loaded.pipe.unet.config.cross_attention_dim)
    if cross is not None and cross != expected:
        raise JobError(
            f"LoRA {entry.sd_name_in_api} does not fit checkpoint {checkpoint} ({want}): its cross-attention "
            f"width is {cross}, the checkpoint's is {expected}"
        )


class _StateCache:
    """Byte-bounded LRU of raw LoRA state dicts, keyed by adapter name (path + mtime)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[StateDict, int]] = OrderedDict()
        self.disk_reads = 0

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def get(self, entry: ModelEntry) -> StateDict:
        key = adapter_name(entry)
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key][0]
        state = read_lora_file(entry.path)
        self.disk_reads += 1
        size = sum(t.numel() * t.element_size() for t in state.values())
        if size <= self.max_bytes:
            self._items[key] = (state, size)
            while self.total_bytes > self.max_bytes:
                self._items.popitem(last=False)
        return state


@dataclass
class _PipeState:
    """Adapters resident on one pipe, least recently used first."""

    adapters: OrderedDict[str, ModelEntry] = field(default_factory=OrderedDict)
    # What the wrapped layers were last told, None = unknown (a load adds layers in their default state).
    # enable_lora/set_adapters walk every parameter of every LoRA layer, so repeating them is the main switch cost.
    enabled: bool | None = None
    active: tuple[tuple[str, float], ...] | None = None


class LoraManager:
    """One per process. Applies a task's LoRA set to a loaded checkpoint's pipe; see the module docstring."""

    def __init__(self, max_loaded_per_pipe: int = 8, max_cached_bytes: int = 512 * 1024 * 1024) -> None:
        if max_loaded_per_pipe < MAX_LORAS_PER_TASK:
            raise ValueError(f"max_loaded_per_pipe must be >= {MAX_LORAS_PER_TASK} (the per-task maximum)")
        self.max_loaded_per_pipe = max_loaded_per_pipe
        self._states = _StateCache(max_cached_bytes)
        self._pipes: weakref.WeakKeyDictionary[Any, _PipeState] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.adapter_loads = 0

    @property
    def disk_reads(self) -> int:
        return self._states.disk_reads

    @property
    def cached_bytes(self) -> int:
        return self._states.total_bytes

    def loaded_adapters(self, loaded: Any) -> list[str]:
        """Names of the adapters resident on this checkpoint's pipe, least recently used first."""
        state = self._pipes.get(loaded.pipe)
        return list(state.adapters) if state else []

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
            pipe = loaded.pipe
            state = self._pipes.get(pipe)
            if state is None:
                state = _PipeState()
                self._pipes[pipe] = state
            for name, entry in entries.items():
                if name not in state.adapters:
                    self._evict_for(pipe, state, keep=set(entries))
                    self._load(loaded, state, name, entry)
                state.adapters.move_to_end(name)
            if not state.adapters:
                return  # never had a LoRA: nothing to switch off
            if not weights:
                if state.enabled is not False:
                    pipe.disable_lora()
                    state.enabled = False
                return
            if state.enabled is not True:
                pipe.enable_lora()
                state.enabled = True
            # peft sums adapters in list order; a fixed order makes a set's output independent of request order.
            active = tuple(sorted(weights.items()))
            if active != state.active:
                pipe.set_adapters([n for n, _ in active], [w for _, w in active])
                state.active = active

    def forget(self, loaded: Any) -> None:
        """Drop the bookkeeping for a checkpoint leaving the cache (its adapters go with the pipe)."""
        with self._lock:
            self._pipes.pop(loaded.pipe, None)

    def _evict_for(self, pipe: Any, state: _PipeState, keep: set[str]) -> None:
        while len(state.adapters) >= self.max_loaded_per_pipe:
            victim = next((n for n in state.adapters if n not in keep), None)
            if victim is None:
                return
            pipe.delete_adapters([victim])
            del state.adapters[victim]
            state.active = None

    def _load(self, loaded: Any, state: _PipeState, name: str, entry: ModelEntry) -> None:
        lora = self._states.get(entry)
        check_base_model(lora, loaded, entry)
        pipe = loaded.pipe
        checkpoint = getattr(loaded, "name", "the checkpoint")
        try:
            pipe.load_lora_weights(lora, adapter_name=name)
        except Exception as exc:  # diffusers/peft raise ValueError, KeyError, RuntimeError (shape) ...
            _drop_partial(pipe, name)
            state.enabled = state.active = None
            raise JobError(
                f"LoRA {entry.sd_name_in_api} could not be applied to checkpoint {checkpoint}: {short_reason(exc)}"
            ) from exc
        present = {n for names in pipe.get_list_adapters().values() for n in names}
        if name not in present:
            raise JobError(f"LoRA {entry.sd_name_in_api} matched no layer of checkpoint {checkpoint}")
        state.adapters[name] = entry
        state.enabled = state.active = None
        self.adapter_loads += 1


def _drop_partial(pipe: Any, name: str) -> None:
    """Remove whatever a failed load left behind so later tasks see a clean pipe."""
    try:
        present = {n for names in pipe.get_list_adapters().values() for n in names}
        if name in present:
            pipe.delete_adapters([name])
    except Exception:  # best effort: the original error is what the user needs to see
        logger.exception("cleanup after a failed LoRA load")
