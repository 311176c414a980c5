"""A1111-style text conditioning: weighted 75-token chunks, clip_skip, SDXL dual encoders.

What is reproduced (AUTOMATIC1111 webui v1.6-1.8, "Original" emphasis, from its documented behaviour):

Chunking (per tokenizer)
    The prompt is parsed by :func:`parse_prompt_attention`; each piece is tokenized without BOS/EOS and every token
    gets its piece's weight. Tokens fill chunks of 75. When a chunk is full and the next token is not a comma,
    the tokens after the last comma of the chunk move to the next chunk if that comma is at most
    ``comma_padding_backtrack`` (A1111 default 20) tokens from the end. ``BREAK`` closes the current chunk (even an
    empty one). A chunk is ``BOS + 75 tokens (padded with EOS) + EOS`` = 77 ids; BOS/EOS/padding have weight 1.
    When the tokenizer's pad token differs from EOS (SDXL's OpenCLIP-G tokenizer, pad ``"!"`` = id 0) every id
    after the first EOS becomes the pad id: this is A1111's ``id_pad = 0`` for OpenCLIP and equals what
    diffusers' SDXL ``tokenizer_2`` (``pad_token="!"``) produces for short prompts.

Textual inversion
    Multi-vector embeddings loaded diffusers-style (tokens ``name``, ``name_1``, ``name_2``...) are expanded: the
    token ``name`` becomes all its vectors, each with the weight of the piece it stands in. Like A1111, an
    embedding never straddles two chunks (it starts a new chunk when it does not fit).

Encoding (per chunk, per encoder)
    SD 1.5: ``clip_skip = 1`` is the last layer after the final LayerNorm; ``clip_skip = k`` is
    ``hidden_states[-k]`` followed by the final LayerNorm (diffusers' ``clip_skip = k - 1``).
    SDXL: A1111 ignores clip_skip for SDXL by default. Both encoders give the penultimate hidden state
    (``hidden_states[-2]``) without the final LayerNorm, which equals diffusers' SDXL ``clip_skip=None``. With
    A1111's option "apply clip skip to CLIP-L" (``sdxl_clip_l_skip=True``) the CLIP-L encoder gives
    ``hidden_states[-clip_skip]`` without LayerNorm (so clip_skip 1 is the last layer *before* the LayerNorm);
    OpenCLIP-G always stays penultimate.

Weighting ("Original" emphasis)
    ``z = z * weight`` per token, then ``z`` is rescaled so that its mean equals the mean before weighting. Done per
    chunk and per encoder.

Output
    Chunks are concatenated along the token axis: ``[1, 77 * k, dim]``. SDXL concatenates CLIP-L and OpenCLIP-G
    along the feature axis. SDXL's pooled embedding is OpenCLIP-G's projected final-layer (after LayerNorm)
    output at the EOS token of the *first* chunk, as in A1111 (``zs[0].pooled``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from underpaint.engine.job import JobError
from underpaint.engine.prompts import is_break, parse_prompt_attention

CHUNK_LENGTH = 75
COMMA_PADDING_BACKTRACK = 20
TextEncoder = CLIPTextModel | CLIPTextModelWithProjection


@dataclass
class TextEncoderBundle:
    """Tokenizers and text encoders of one checkpoint: one pair for SD 1.5, [CLIP-L, OpenCLIP-G] for SDXL, and
    [OpenCLIP-G] alone for the SDXL refiner (``refiner``; same layer and pooling as the base's OpenCLIP-G)."""

    tokenizers: list[CLIPTokenizer]
    text_encoders: list[TextEncoder]
    is_sdxl: bool
    refiner: bool = False


@dataclass
class Conditioning:
    """Encoded prompt: ``embeds`` is ``[1, 77 * chunks, dim]``; ``pooled`` is ``[1, dim_pool]`` for SDXL."""

    embeds: Tensor
    pooled: Tensor | None = None


@dataclass
class PromptChunk:
    """77 token ids (BOS, 75 prompt or padding ids, EOS) and one weight per id."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)


class _ChunkBuilder:
    """Fills 75-token chunks the way A1111 does (comma backtrack, BREAK, embeddings kept whole)."""

    def __init__(self, tokenizer: CLIPTokenizer, comma_padding_backtrack: int) -> None:
        self.bos = _require_id(tokenizer.bos_token_id, "BOS")
        self.eos = _require_id(tokenizer.eos_token_id, "EOS")
        pad = tokenizer.pad_token_id
        self.pad = self.eos if pad is None else int(pad)
        # convert_tokens_to_ids, not get_vocab(): the latter builds a 49k-entry dict per call (10-18 ms).
        self.comma = _lookup(tokenizer, ",</w>")
        self.backtrack = comma_padding_backtrack
        self.chunks: list[PromptChunk] = []
        self.current = PromptChunk()
        self.last_comma = -1

    def close_chunk(self) -> None:
        tokens = self.current.tokens + [self.eos] * (CHUNK_LENGTH - len(self.current.tokens))
        weights = self.current.multipliers + [1.0] * (CHUNK_LENGTH - len(self.current.multipliers))
        ids = [self.bos, *tokens, self.eos]
        if self.pad != self.eos:
            first_eos = ids.index(self.eos)
            ids = ids[: first_eos + 1] + [self.pad] * (len(ids) - first_eos - 1)
        self.chunks.append(PromptChunk(ids, [1.0, *weights, 1.0]))
        self.current = PromptChunk()
        self.last_comma = -1

    def add(self, ids: Sequence[int], weight: float) -> None:
        """Add one unit: a single token, or all vectors of one embedding."""
        if len(ids) == 1 and ids[0] == self.comma:
            self.last_comma = len(self.current.tokens)
        elif self._should_backtrack():
            self._move_after_last_comma()
        if len(self.current.tokens) + len(ids) > CHUNK_LENGTH:
            self.close_chunk()
        self.current.tokens.extend(ids)
        self.current.multipliers.extend([weight] * len(ids))

    def finish(self) -> list[PromptChunk]:
        if self.current.tokens or not self.chunks:
            self.close_chunk()
        return self.chunks

    def _should_backtrack(self) -> bool:
        filled = len(self.current.tokens)
        return (
            self.backtrack != 0
            and filled == CHUNK_LENGTH
            and self.last_comma != -1
            and filled - self.last_comma <= self.backtrack
        )

    def _move_after_last_comma(self) -> None:
        cut = self.last_comma + 1
        moved = PromptChunk(self.current.tokens[cut:], self.current.multipliers[cut:])
        del self.current.tokens[cut:]
        del self.current.multipliers[cut:]
        self.close_chunk()
        self.current = moved


def _require_id(token_id: int | None, name: str) -> int:
    if token_id is None:
        raise ValueError(f"tokenizer has no {name} token")
    return int(token_id)


def token_expansion_ids(
    tokenizer: CLIPTokenizer, token_expansions: Mapping[str, Sequence[str]] | None = None
) -> dict[int, list[int]]:
    """Map a multi-vector embedding's token id to the ids of all its vectors.

    ``token_expansions`` maps a token to all its vector tokens, e.g. ``{"emb": ["emb", "emb_1", "emb_2"]}``.
    Without it, the tokenizer's added tokens are read with diffusers' naming: ``name`` followed by ``name_1``,
    ``name_2``... (consecutive) is one embedding.
    """
    if token_expansions is not None:
        if any(not tokens for tokens in token_expansions.values()):
            raise ValueError("every textual inversion token must expand to at least one token")
        return {
            _token_id(tokenizer, head): [_token_id(tokenizer, token) for token in tokens]
            for head, tokens in token_expansions.items()
        }
    added = tokenizer.get_added_vocab()
    special = set(tokenizer.all_special_tokens)
    result: dict[int, list[int]] = {}
    for name, head_id in added.items():
        if name in special:
            continue
        ids = [head_id]
        while f"{name}_{len(ids)}" in added:
            ids.append(added[f"{name}_{len(ids)}"])
        if len(ids) > 1:
            result[head_id] = ids
    return result


def _lookup(tokenizer: CLIPTokenizer, token: str) -> int | None:
    """The id of ``token`` or None; unknown tokens map to the unk id, which only the unk token itself may have."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


def _token_id(tokenizer: CLIPTokenizer, token: str) -> int:
    token_id = _lookup(tokenizer, token)
    if token_id is None:
        raise ValueError(f"textual inversion token {token!r} is not in the tokenizer")
    return token_id


def tokenize_prompt(
    tokenizer: CLIPTokenizer,
    prompt: str,
    *,
    token_expansions: Mapping[str, Sequence[str]] | None = None,
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> list[PromptChunk]:
    """Split a prompt into weighted 77-id chunks (see the module docstring)."""
    if comma_padding_backtrack < 0:
        raise ValueError("comma_padding_backtrack must be >= 0")
    parsed = parse_prompt_attention(prompt)
    expansions = token_expansion_ids(tokenizer, token_expansions)
    too_long = [ids for ids in expansions.values() if len(ids) > CHUNK_LENGTH]
    if too_long:
        raise JobError(f"a textual inversion embedding has {len(too_long[0])} vectors, at most {CHUNK_LENGTH} fit")
    pieces = tokenizer([text for text, _ in parsed], add_special_tokens=False, truncation=False, verbose=False)
    builder = _ChunkBuilder(tokenizer, comma_padding_backtrack)
    for (text, weight), ids in zip(parsed, pieces["input_ids"], strict=True):
        if is_break((text, weight)):
            builder.close_chunk()
            continue
        for token in ids:
            builder.add(expansions.get(token, [token]), weight)
    return builder.finish()


def encode_prompt(
    bundle: TextEncoderBundle,
    prompt: str,
    clip_skip: int = 1,
    *,
    sdxl_clip_l_skip: bool = False,
    token_expansions: Mapping[str, Sequence[str]] | None = None,
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> Conditioning:
    """Encode an A1111 prompt. ``clip_skip`` has A1111's meaning (1 = last layer); see the module docstring."""
    _check_bundle(bundle)
    _check_clip_skip(bundle, clip_skip, sdxl_clip_l_skip)
    per_encoder: list[Tensor] = []
    pooled: Tensor | None = None
    for index, (tokenizer, encoder) in enumerate(zip(bundle.tokenizers, bundle.text_encoders, strict=True)):
        chunks = tokenize_prompt(
            tokenizer, prompt, token_expansions=token_expansions, comma_padding_backtrack=comma_padding_backtrack
        )
        layer = _layer_choice(bundle, index, clip_skip, sdxl_clip_l_skip)
        want_pooled = bundle.is_sdxl and index == len(bundle.text_encoders) - 1  # OpenCLIP-G
        embeds, first_pooled = _encode_chunks(
            encoder, chunks, layer, want_pooled, _require_id(tokenizer.eos_token_id, "EOS")
        )
        per_encoder.append(embeds)
        if want_pooled:
            pooled = first_pooled
    if len({e.shape[1] for e in per_encoder}) != 1:
        raise ValueError(
            "the SDXL tokenizers split the prompt into different chunk counts (textual inversion loaded in one only?)"
        )
    return Conditioning(embeds=torch.cat(per_encoder, dim=-1), pooled=pooled)


@dataclass(frozen=True)
class _Layer:
    """Which hidden state to take: ``hidden_states[index]``, optionally followed by the final LayerNorm."""

    index: int
    final_norm: bool


def _layer_choice(bundle: TextEncoderBundle, encoder_index: int, clip_skip: int, sdxl_clip_l_skip: bool) -> _Layer:
    if not bundle.is_sdxl:
        return _Layer(-clip_skip, final_norm=True)
    if encoder_index == 0 and sdxl_clip_l_skip and not bundle.refiner:
        return _Layer(-clip_skip, final_norm=False)
    return _Layer(-2, final_norm=False)


def _encode_chunks(
    encoder: TextEncoder, chunks: list[PromptChunk], layer: _Layer, want_pooled: bool, eos_id: int
) -> tuple[Tensor, Tensor | None]:
    param = next(encoder.parameters())
    encoded: list[Tensor] = []
    pooled: Tensor | None = None
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk.tokens], dtype=torch.long, device=param.device)
            out = encoder(input_ids=ids, output_hidden_states=True)
            hidden = out.hidden_states[layer.index]
            z = encoder.text_model.final_layer_norm(hidden) if layer.final_norm else hidden
            weights = torch.tensor(chunk.multipliers, dtype=z.dtype, device=z.device)
            encoded.append(apply_emphasis(z, weights))
            if want_pooled and pooled is None:
                pooled = _pooled_at_eos(encoder, out.last_hidden_state, chunk.tokens.index(eos_id))
    return torch.cat(encoded, dim=1), pooled


def _pooled_at_eos(encoder: TextEncoder, last_hidden: Tensor, eos_position: int) -> Tensor:
    """OpenCLIP-G pooling: the normed last layer at the EOS token, through the text projection."""
    projection = getattr(encoder, "text_projection", None)
    if projection is None:
        raise ValueError("the SDXL second text encoder must be a CLIPTextModelWithProjection")
    pooled: Tensor = projection(last_hidden[:, eos_position])
    return pooled


def apply_emphasis(z: Tensor, weights: Tensor) -> Tensor:
    """A1111 "Original" emphasis: scale each token by its weight, then restore the mean of ``z``."""
    original_mean = z.mean()
    weighted = z * weights.reshape(1, -1, 1)
    new_mean = weighted.mean()
    if new_mean == 0:
        return weighted
    return weighted * (original_mean / new_mean)


def _check_bundle(bundle: TextEncoderBundle) -> None:
    expected = 2 if bundle.is_sdxl and not bundle.refiner else 1
    if len(bundle.tokenizers) != expected or len(bundle.text_encoders) != expected:
        raise ValueError(
            f"{'SDXL' if bundle.is_sdxl else 'SD 1.5'} needs {expected} tokenizer(s) and text encoder(s), got "
            f"{len(bundle.tokenizers)} and {len(bundle.text_encoders)}"
        )


def _check_clip_skip(bundle: TextEncoderBundle, clip_skip: int, sdxl_clip_l_skip: bool) -> None:
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(f"clip_skip must be an integer >= 1 (A1111 meaning, 1 = last layer), got {clip_skip!r}")
    layers = int(bundle.text_encoders[0].config.num_hidden_layers)
    if (not bundle.is_sdxl or (sdxl_clip_l_skip and not bundle.refiner)) and clip_skip > layers:
        raise JobError(f"clip_skip {clip_skip} exceeds the text encoder's {layers} layers")


def pad_to_same_length(a: Conditioning, b: Conditioning, empty: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Make cond and uncond the same token length the way A1111 >= 1.6 does ("pad prompt/negative prompt").

    The shorter one gets the encoding of the empty prompt (``empty``, one 77-token chunk, encoded with the same
    clip_skip) appended as many times as needed; pooled embeddings are unchanged. Without this option A1111 runs
    cond and uncond through the UNet separately, which is the same as leaving both unpadded.
    """
    chunk = empty.embeds.shape[1]
    if empty.embeds.shape[-1] != a.embeds.shape[-1] or a.embeds.shape[-1] != b.embeds.shape[-1]:
        raise ValueError("conditionings to pad have different feature sizes")
    difference = a.embeds.shape[1] - b.embeds.shape[1]
    if difference % chunk != 0:
        raise ValueError(
            f"token lengths {a.embeds.shape[1]} and {b.embeds.shape[1]} differ by a non-multiple of {chunk}"
        )
    if difference > 0:
        return a, _append_empty(b, empty, difference // chunk)
    if difference < 0:
        return _append_empty(a, empty, -difference // chunk), b
    return a, b


def encode_prompt_pair(
    bundle: TextEncoderBundle,
    prompt: str,
    negative_prompt: str,
    clip_skip: int = 1,
    *,
    sdxl_clip_l_skip: bool = False,
    token_expansions: Mapping[str, Sequence[str]] | None = None,
    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK,
) -> tuple[Conditioning, Conditioning]:
    """Encode prompt and negative prompt; when their chunk counts differ, pad with :func:`pad_to_same_length`."""

    def encode(text: str) -> Conditioning:
        return encode_prompt(
            bundle,
            text,
            clip_skip,
            sdxl_clip_l_skip=sdxl_clip_l_skip,
            token_expansions=token_expansions,
            comma_padding_backtrack=comma_padding_backtrack,
        )

    cond, uncond = encode(prompt), encode(negative_prompt)
    if cond.embeds.shape[1] == uncond.embeds.shape[1]:
        return cond, uncond
    return pad_to_same_length(cond, uncond, encode(""))


def _append_empty(c: Conditioning, empty: Conditioning, repeats: int) -> Conditioning:
    padding = empty.embeds.to(c.embeds).repeat(c.embeds.shape[0], repeats, 1)
    return Conditioning(embeds=torch.cat([c.embeds, padding], dim=1), pooled=c.pooled)


__all__ = [
    "CHUNK_LENGTH",
    "COMMA_PADDING_BACKTRACK",
    "Conditioning",
    "PromptChunk",
    "TextEncoderBundle",
    "apply_emphasis",
    "encode_prompt",
    "encode_prompt_pair",
    "pad_to_same_length",
    "token_expansion_ids",
    "tokenize_prompt",
]
