"""Textual-inversion embeddings, A1111 style (field notes 5). The rules are documented in docs/adapters.md.

Files: A1111 ``.pt`` / ``.bin`` (``string_to_param``), A1111 ``.safetensors`` (``emb_params``), SDXL ``.safetensors``
(``clip_l`` + ``clip_g``), and the diffusers one-key ``{token: tensor}`` layout, read by ``engine.weights`` (pickles
only with ``torch.load(weights_only=True)``).

An embedding's token is its file stem. Where the stem appears in the prompt or the negative prompt (as a whole word,
case-insensitive, also inside ``(...)``/``[...]`` weighting), the embedding applies there, as in A1111. A requested
embedding whose token appears in neither is appended, as ``", <stem>"``, to the negative prompt when it looks like a
negative embedding (``is_negative_embedding``), else to the prompt.

How vectors reach the text encoder, and why: a task must not be affected by embeddings an earlier task loaded, and
reloading tokenizers per task is slow. So vectors live in *slot tokens* (``upti0000``, ``upti0001``, ... added once to
the tokenizer(s), rows appended to the token embedding of each text encoder). A task's stems are rewritten to their
slot tokens in the text handed to the prompt encoder; the stem itself never becomes a tokenizer token, so a prompt
that mentions an embedding that was not requested tokenizes exactly as without it. Slots are per pipe, reused LRU
(bounded by ``max_vectors_per_pipe``), and unused rows are never read, so outputs of prompts without embeddings are
byte-identical whether or not anything is loaded.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from underpaint.engine.job import JobError
from underpaint.engine.lru import logged_load
from underpaint.engine.weights import UnreadableWeights, read_weights
from underpaint.registry import ModelEntry

MAX_EMBEDDINGS_PER_TASK = 5
SLOT_PREFIX = "upti"
# Substrings (case-insensitive) of a file stem or of the name stored in the file that mark a negative embedding:
# EasyNegative, ng_deepnegative, FastNegativeV2, badhandv4, BadDream, bad-artist, verybadimagenegative,
# UnrealisticDream, unaestheticXL, worst quality / lowres / deformed style embeddings.
NEGATIVE_MARKERS = ("neg", "bad", "worst", "lowres", "unaesthetic", "unrealistic", "deformed")
_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class EmbeddingFile:
    """Vectors of one file: ``clip_l`` (SD 1.5 and SDXL's first encoder) and, for SDXL files, ``clip_g``."""

    clip_l: torch.Tensor  # (vectors, dim)
    clip_g: torch.Tensor | None
    name: str | None  # the name stored in the file, if any
    marked_negative: bool  # metadata "negative" / "is_negative" set to true

    @property
    def num_vectors(self) -> int:
        return int(self.clip_l.shape[0])


@dataclass
class EmbeddingPlan:
    """What to encode for one task.

    ``prompt`` / ``negative_prompt`` are the texts for the prompt encoder (stems replaced by slot tokens);
    ``token_expansions`` maps each slot head token to all its vector tokens (``conditioning.encode_prompt``'s
    argument). ``display_prompt`` / ``display_negative_prompt`` are the same texts with the stems, for infotext.
    ``appended`` names the embeddings the unmentioned-embedding rule placed: stem -> "prompt" | "negative_prompt".
    """

    prompt: str
    negative_prompt: str
    token_expansions: dict[str, list[str]] = field(default_factory=dict)
    display_prompt: str = ""
    display_negative_prompt: str = ""
    appended: dict[str, str] = field(default_factory=dict)

    def expand(self, text: str) -> str:
        """``text`` with each head token written out as all its vector tokens (for encoders without expansion)."""
        for head, tokens in self.token_expansions.items():
            text = re.sub(rf"(?<![0-9a-z]){re.escape(head)}(?![0-9])", " ".join(tokens), text)
        return text


def _as_matrix(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2) or value.numel() == 0:
        raise JobError(f"{what} is not a (vectors, dim) tensor")
    tensor = value.detach().to(torch.float32)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor


def read_embedding_file(path: Path) -> EmbeddingFile:
    """Parse any supported embedding file; ``JobError`` with the reason when it is not one."""
    label = f"embedding {path.name}"
    try:
        stored = read_weights(path)
    except UnreadableWeights as exc:
        raise JobError(f"{label} could not be read: {exc.reason}") from exc
    data, metadata = stored.data, stored.metadata
    if isinstance(data, torch.Tensor):
        return EmbeddingFile(_as_matrix(data, label), None, None, False)
    if not isinstance(data, dict):
        raise JobError(f"{label} is not a textual-inversion file")
    name = data.get("name") if isinstance(data.get("name"), str) else metadata.get("name")
    marked = any(metadata.get(k, "").lower() in _TRUE for k in ("negative", "is_negative"))
    if "clip_l" in data or "clip_g" in data:
        if "clip_l" not in data or "clip_g" not in data:
            raise JobError(f"{label}: an SDXL embedding needs both clip_l and clip_g")
        clip_l, clip_g = _as_matrix(data["clip_l"], label), _as_matrix(data["clip_g"], label)
        if clip_l.shape[0] != clip_g.shape[0]:
            raise JobError(f"{label}: clip_l and clip_g have different vector counts")
        return EmbeddingFile(clip_l, clip_g, name, marked)
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise JobError(f"{label}: string_to_param is not a mapping of tensors")
        return EmbeddingFile(_as_matrix(next(iter(params.values())), label), None, name, marked)
    if "emb_params" in data:
        return EmbeddingFile(_as_matrix(data["emb_params"], label), None, name, marked)
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:  # diffusers: {"<token>": tensor}
        return EmbeddingFile(_as_matrix(tensors[0], label), None, name, marked)
    raise JobError(f"{label}: no string_to_param, emb_params or clip_l/clip_g in the file")


def is_negative_embedding(stem: str, file: EmbeddingFile | None = None) -> bool:
    """The unmentioned-embedding rule's test: a negative marker in the stem or the stored name, or metadata flag."""
    names = [stem] + ([file.name] if file is not None and file.name else [])
    if file is not None and file.marked_negative:
        return True
    return any(marker in n.lower() for n in names for marker in NEGATIVE_MARKERS)


def token_pattern(stem: str) -> re.Pattern[str]:
    """The stem as a whole word, case-insensitive (CLIP lowercases prompts)."""
    return re.compile(rf"(?<![0-9A-Za-z_]){re.escape(stem)}(?![0-9A-Za-z_])", re.IGNORECASE)


def _append(text: str, token: str) -> str:
    return f"{text.rstrip()}, {token}" if text.strip() else token


def slot_token(index: int) -> str:
    return f"{SLOT_PREFIX}{index:04d}"


def _encoders(pipe: Any) -> list[tuple[Any, nn.Module]]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if getattr(pipe, "text_encoder_2", None) is not None:
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return pairs


def _token_id(tokenizer: Any, token: str) -> int:
    # get_added_vocab() is small; get_vocab() would build the whole 49k-entry dict on every call.
    if token not in tokenizer.get_added_vocab():
        tokenizer.add_tokens([token])
    return int(tokenizer.get_added_vocab()[token])


def _ensure_rows(encoder: nn.Module, rows: int) -> nn.Embedding:
    """Grow the token embedding to ``rows``, new rows zero; existing rows are copied bit for bit."""
    old: nn.Embedding = encoder.get_input_embeddings()  # type: ignore[operator]
    if old.num_embeddings >= rows:
        return old
    new = nn.Embedding(rows, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[: old.num_embeddings] = old.weight
    encoder.set_input_embeddings(new)  # type: ignore[operator]
    encoder.config.vocab_size = rows  # type: ignore[union-attr]
    return new


@dataclass
class _Resident:
    slots: list[int]
    file: EmbeddingFile


@dataclass
class _PipeSlots:
    """Slot usage on one pipe: resident embeddings (LRU first) and their slot indices."""

    resident: OrderedDict[tuple[str, float, int], _Resident] = field(default_factory=OrderedDict)
    allocated: int = 0  # slots 0..allocated-1 exist on this pipe's encoders

    def free_slots(self) -> list[int]:
        used = {i for r in self.resident.values() for i in r.slots}
        return [i for i in range(self.allocated) if i not in used]


class EmbeddingManager:
    """One per process; per-pipe slot state. See the module docstring for the rules."""

    def __init__(self, max_vectors_per_pipe: int = 512) -> None:
        self.max_vectors_per_pipe = max_vectors_per_pipe
        self._pipes: weakref.WeakKeyDictionary[Any, _PipeSlots] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.file_loads = 0

    def resident(self, loaded: Any) -> int:
        """How many embeddings are resident on this checkpoint's pipe."""
        slots = self._pipes.get(loaded.pipe)
        return len(slots.resident) if slots else 0

    def forget(self, loaded: Any) -> None:
        with self._lock:
            self._pipes.pop(loaded.pipe, None)

    def apply(self, loaded: Any, entries: Sequence[ModelEntry], prompt: str, negative_prompt: str) -> EmbeddingPlan:
        """Load ``entries`` into the pipe's text encoder(s) and return the texts/expansions for this task."""
        if len(entries) > MAX_EMBEDDINGS_PER_TASK:
            raise JobError(f"at most {MAX_EMBEDDINGS_PER_TASK} embeddings per task, got {len(entries)}")
        unique = list({_key(e): e for e in entries}.values())
        stems = [e.stem.lower() for e in unique]
        clash = next((e.stem for e in unique if stems.count(e.stem.lower()) > 1), None)
        if clash is not None:
            raise JobError(f"two requested embeddings share the token {clash!r}; rename one of the files")
        with self._lock:
            residents = {e.stem: self._load(loaded, e) for e in unique}
        heads = {stem: [slot_token(i) for i in r.slots] for stem, r in residents.items()}
        display_prompt, display_negative = prompt, negative_prompt
        appended: dict[str, str] = {}
        for entry in unique:
            pattern = token_pattern(entry.stem)
            if pattern.search(display_prompt) or pattern.search(display_negative):
                continue
            if is_negative_embedding(entry.stem, residents[entry.stem].file):
                display_negative = _append(display_negative, entry.stem)
                appended[entry.stem] = "negative_prompt"
            else:
                display_prompt = _append(display_prompt, entry.stem)
                appended[entry.stem] = "prompt"
        encoded_prompt, encoded_negative = display_prompt, display_negative
        # Longest stems first so that "bad" never eats part of "bad_hands" (the pattern is whole-word anyway).
        for stem in sorted(heads, key=len, reverse=True):
            tokens = heads[stem]
            pattern = token_pattern(stem)
            encoded_prompt = pattern.sub(tokens[0], encoded_prompt)
            encoded_negative = pattern.sub(tokens[0], encoded_negative)
        return EmbeddingPlan(
            prompt=encoded_prompt,
            negative_prompt=encoded_negative,
            token_expansions={tokens[0]: tokens for tokens in heads.values()},
            display_prompt=display_prompt,
            display_negative_prompt=display_negative,
            appended=appended,
        )

    def _load(self, loaded: Any, entry: ModelEntry) -> _Resident:
        pipe = loaded.pipe
        state = self._pipes.get(pipe)
        if state is None:
            state = _PipeSlots()
            self._pipes[pipe] = state
        key = _key(entry)
        if key in state.resident:
            state.resident.move_to_end(key)
            return state.resident[key]
        file = logged_load("embedding", entry.sd_name, lambda: read_embedding_file(entry.path))
        self.file_loads += 1
        encoders = _encoders(pipe)
        vectors = _vectors_for(file, encoders, loaded, entry)
        slots = self._take_slots(state, file.num_vectors, keep=key)
        for (tokenizer, encoder), matrix in zip(encoders, vectors, strict=True):
            ids = [_token_id(tokenizer, slot_token(i)) for i in slots]
            table = _ensure_rows(encoder, max(len(tokenizer), max(ids) + 1))
            with torch.no_grad():
                table.weight[ids] = matrix.to(device=table.weight.device, dtype=table.weight.dtype)
        resident = _Resident(slots, file)
        state.resident[key] = resident
        return resident

    def _take_slots(self, state: _PipeSlots, count: int, keep: tuple[str, float, int]) -> list[int]:
        if count > self.max_vectors_per_pipe:
            raise JobError(f"an embedding with {count} vectors exceeds the limit of {self.max_vectors_per_pipe}")
        free = state.free_slots()
        while len(free) + (self.max_vectors_per_pipe - state.allocated) < count:
            victim = next((k for k in state.resident if k != keep), None)
            if victim is None:
                raise JobError("the task's embeddings need more vectors than the slot limit allows")
            del state.resident[victim]
            free = state.free_slots()
        slots = free[:count]
        while len(slots) < count:
            slots.append(state.allocated)
            state.allocated += 1
        return slots


def _key(entry: ModelEntry) -> tuple[str, float, int]:
    return (str(entry.path.resolve()), entry.mtime, entry.size)


def _vectors_for(
    file: EmbeddingFile, encoders: list[tuple[Any, nn.Module]], loaded: Any, entry: ModelEntry
) -> list[torch.Tensor]:
    """One (vectors, dim) matrix per text encoder, or a ``JobError`` when the file is for the other base model."""
    checkpoint = getattr(loaded, "name", "the checkpoint")
    name = entry.sd_name_in_api
    if loaded.is_sdxl and file.clip_g is None:
        raise JobError(
            f"embedding {name} is an SD 1.5 embedding; checkpoint {checkpoint} is SDXL (needs clip_l + clip_g)"
        )
    if not loaded.is_sdxl and file.clip_g is not None:
        raise JobError(f"embedding {name} is an SDXL embedding (clip_l + clip_g); checkpoint {checkpoint} is SD 1.5")
    matrices = [file.clip_l] + ([file.clip_g] if file.clip_g is not None else [])
    for (_, encoder), matrix in zip(encoders, matrices, strict=True):
        dim = int(encoder.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
        if matrix.shape[1] != dim:
            raise JobError(
                f"embedding {name} has {matrix.shape[1]}-dim vectors; checkpoint {checkpoint}'s text encoder "
                f"expects {dim}"
            )
    return matrices
