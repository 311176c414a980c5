"""A1111 text conditioning on tiny random CLIP encoders with the real CLIP tokenizer."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tests.support import tiny_text as tiny
from torch.testing import assert_close

from underpaint.engine.conditioning import (
    Conditioning,
    TextEncoderBundle,
    apply_emphasis,
    encode_prompt,
    encode_prompt_pair,
    pad_to_same_length,
    tokenize_prompt,
)
from underpaint.engine.job import JobError

BOS, EOS = 49406, 49407
CAT, DOG, COMMA = 2368, 1929, 267


@pytest.fixture(scope="module")
def sd15() -> TextEncoderBundle:
    return tiny.sd15_bundle()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> TextEncoderBundle:
    return tiny.sdxl_bundle(tmp_path_factory.mktemp("sdxl"))


def _sd15_pipe(bundle: TextEncoderBundle) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=None,
        text_encoder=bundle.text_encoders[0],
        tokenizer=bundle.tokenizers[0],
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipe(bundle: TextEncoderBundle) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(  # type: ignore[no-untyped-call]
        vae=None,
        text_encoder=bundle.text_encoders[0],
        text_encoder_2=bundle.text_encoders[1],
        tokenizer=bundle.tokenizers[0],
        tokenizer_2=bundle.tokenizers[1],
        unet=None,
        scheduler=None,
    )


# --- chunking -------------------------------------------------------------------------------------------


def test_short_prompt_chunk_matches_the_tokenizers_padded_ids(sdxl: TextEncoderBundle) -> None:
    for tokenizer in sdxl.tokenizers:  # pad = EOS for CLIP-L, "!" (0) for OpenCLIP-G
        (chunk,) = tokenize_prompt(tokenizer, "a photo of a cat")
        expected = tokenizer("a photo of a cat", padding="max_length", max_length=77)["input_ids"]
        assert chunk.tokens == expected
        assert chunk.multipliers == [1.0] * 77
    (bang,) = tokenize_prompt(sdxl.tokenizers[1], "cat")
    assert bang.tokens[:4] == [BOS, CAT, EOS, 0]
    assert set(bang.tokens[3:]) == {0}


def test_weights_are_assigned_per_token(sd15: TextEncoderBundle) -> None:
    (chunk,) = tokenize_prompt(sd15.tokenizers[0], "a (cat dog:1.5) [cat]")
    assert chunk.tokens[:6] == [BOS, 320, CAT, DOG, CAT, EOS]
    assert chunk.multipliers[:6] == pytest.approx([1.0, 1.0, 1.5, 1.5, 1 / 1.1, 1.0])


def test_long_prompt_is_split_into_75_token_chunks(sd15: TextEncoderBundle) -> None:
    chunks = tokenize_prompt(sd15.tokenizers[0], "cat " * 120)
    assert len(chunks) == 2
    assert chunks[0].tokens == [BOS, *[CAT] * 75, EOS]
    assert chunks[1].tokens == [BOS, *[CAT] * 45, *[EOS] * 31]


def test_break_starts_a_new_chunk(sd15: TextEncoderBundle) -> None:
    tokenizer = sd15.tokenizers[0]
    first, second = tokenize_prompt(tokenizer, "cat BREAK dog")
    assert first.tokens[:3] == [BOS, CAT, EOS]
    assert second.tokens[:3] == [BOS, DOG, EOS]
    assert len(tokenize_prompt(tokenizer, "cat BREAK")) == 1  # no trailing empty chunk
    assert len(tokenize_prompt(tokenizer, "BREAK cat")) == 2  # a leading empty chunk
    assert len(tokenize_prompt(tokenizer, "cat BREAK BREAK dog")) == 3


def test_break_inside_brackets_is_weighted_text_like_a1111(sd15: TextEncoderBundle) -> None:
    (chunk,) = tokenize_prompt(sd15.tokenizers[0], "(cat BREAK dog)")
    break_id = sd15.tokenizers[0].convert_tokens_to_ids("break</w>")
    assert chunk.tokens[:5] == [BOS, CAT, break_id, DOG, EOS]
    assert chunk.multipliers[1:4] == pytest.approx([1.1, -1.1, 1.1])


def test_comma_padding_backtrack_moves_the_tail_after_the_last_comma(sd15: TextEncoderBundle) -> None:
    tokenizer = sd15.tokenizers[0]
    prompt = "cat " * 70 + ", " + "(dog:1.3) " * 10
    first, second = tokenize_prompt(tokenizer, prompt)
    assert first.tokens == [BOS, *[CAT] * 70, COMMA, *[EOS] * 5]
    assert second.tokens[:12] == [BOS, *[DOG] * 10, EOS]
    assert second.multipliers[1:11] == pytest.approx([1.3] * 10)

    first, second = tokenize_prompt(tokenizer, prompt, comma_padding_backtrack=0)
    assert first.tokens == [BOS, *[CAT] * 70, COMMA, *[DOG] * 4, EOS]
    assert second.tokens[:8] == [BOS, *[DOG] * 6, EOS]


def test_no_backtrack_when_the_comma_is_too_far_back(sd15: TextEncoderBundle) -> None:
    first, _ = tokenize_prompt(sd15.tokenizers[0], "cat " * 44 + ", " + "dog " * 40)
    assert first.tokens == [BOS, *[CAT] * 44, COMMA, *[DOG] * 30, EOS]


# --- textual inversion expansion --------------------------------------------------------------------------


def _bundle_with_embedding() -> tuple[TextEncoderBundle, list[int]]:
    bundle = tiny.sd15_bundle()
    tokenizer, encoder = bundle.tokenizers[0], bundle.text_encoders[0]
    tokenizer.add_tokens(["emb", "emb_1", "emb_2"])
    encoder.resize_token_embeddings(len(tokenizer))
    converted = tokenizer.convert_tokens_to_ids(["emb", "emb_1", "emb_2"])
    assert isinstance(converted, list)  # a list of tokens gives a list of ids
    ids = [int(i) for i in converted]
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        weight[ids] = torch.randn(3, encoder.config.hidden_size)  # type: ignore[operator]  # transformers: untyped
    return bundle, ids


def test_multi_vector_embedding_is_expanded_and_weighted_with_its_group() -> None:
    bundle, ids = _bundle_with_embedding()
    (chunk,) = tokenize_prompt(bundle.tokenizers[0], "a (emb cat:1.5)")
    assert chunk.tokens[:7] == [BOS, 320, *ids, CAT, EOS]
    assert chunk.multipliers[:7] == pytest.approx([1.0, 1.0, 1.5, 1.5, 1.5, 1.5, 1.0])
    explicit = tokenize_prompt(bundle.tokenizers[0], "a (emb cat:1.5)", token_expansions={"emb": ["emb", "emb_1"]})
    assert explicit[0].tokens[:6] == [BOS, 320, *ids[:2], CAT, EOS]


def test_embedding_never_straddles_two_chunks() -> None:
    bundle, ids = _bundle_with_embedding()
    first, second = tokenize_prompt(bundle.tokenizers[0], "cat " * 73 + "emb")
    assert first.tokens == [BOS, *[CAT] * 73, EOS, EOS, EOS]
    assert second.tokens[:5] == [BOS, *ids, EOS]


def test_embedding_changes_output_only_for_prompts_that_use_it() -> None:
    plain_bundle = tiny.sd15_bundle()
    bundle, _ = _bundle_with_embedding()
    assert torch.equal(encode_prompt(plain_bundle, "a cat").embeds, encode_prompt(bundle, "a cat").embeds)
    with_emb = encode_prompt(bundle, "a (emb:1.2) cat").embeds
    assert not torch.allclose(with_emb, encode_prompt(bundle, "a cat").embeds)


def test_unknown_explicit_expansion_token_is_a_clear_error(sd15: TextEncoderBundle) -> None:
    with pytest.raises(ValueError, match="not in the tokenizer"):
        tokenize_prompt(sd15.tokenizers[0], "a cat", token_expansions={"nope_emb": ["nope_emb", "nope_emb_1"]})


# --- SD 1.5 encoding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_sd15_matches_diffusers_with_clip_skip_minus_one(sd15: TextEncoderBundle, clip_skip: int) -> None:
    pipe = _sd15_pipe(sd15)
    reference, _ = pipe.encode_prompt(  # type: ignore[attr-defined]  # hidden by diffusers' lazy exports
        "a photo of a cat", torch.device("cpu"), 1, False, clip_skip=None if clip_skip == 1 else clip_skip - 1
    )
    ours = encode_prompt(sd15, "a photo of a cat", clip_skip=clip_skip)
    assert ours.pooled is None
    assert_close(ours.embeds, reference)


def test_clip_skip_changes_the_output(sd15: TextEncoderBundle) -> None:
    one, two = (encode_prompt(sd15, "a photo of a cat", clip_skip=k).embeds for k in (1, 2))
    assert not torch.allclose(one, two)


def test_equivalent_prompts_give_equal_embeddings(sd15: TextEncoderBundle) -> None:
    pairs = [
        ("a (cat)", "a (cat:1.1)"),
        ("a [cat]", f"a (cat:{1 / 1.1!r})"),
        ("a ((cat))", "a (cat:1.2100000000000002)"),
        ("a (cat:1.0)", "a cat"),
        (r"a \(cat\)", r"a \(cat)"),
        ("a (cat", "a (cat:1.1)"),
    ]
    for left, right in pairs:
        assert_close(encode_prompt(sd15, left).embeds, encode_prompt(sd15, right).embeds, rtol=0, atol=0)


def test_weights_change_the_output_and_keep_the_mean(sd15: TextEncoderBundle) -> None:
    plain = encode_prompt(sd15, "a photo of a cat").embeds
    weighted = encode_prompt(sd15, "a photo of a (cat:1.5)").embeds
    assert not torch.allclose(plain, weighted)
    assert_close(weighted.mean(), plain.mean())


def test_emphasis_scales_tokens_then_restores_the_mean() -> None:
    torch.manual_seed(0)
    z = torch.randn(1, 4, 3) + 0.5
    weights = torch.tensor([1.0, 2.0, 0.5, 1.0])
    result = apply_emphasis(z, weights)
    assert_close(result.mean(), z.mean())
    expected_ratio = weights.reshape(1, -1, 1) * (z.mean() / (z * weights.reshape(1, -1, 1)).mean())
    assert_close(result / z, expected_ratio.expand_as(z))


def test_120_token_prompt_gives_two_chunks(sd15: TextEncoderBundle) -> None:
    long = encode_prompt(sd15, "cat " * 120).embeds
    truncated = encode_prompt(sd15, "cat " * 75).embeds
    assert long.shape == (1, 154, 32)
    assert_close(long[:, :77], truncated)
    assert not torch.allclose(long[:, 77:], truncated)


def test_break_gives_two_chunks(sd15: TextEncoderBundle) -> None:
    split = encode_prompt(sd15, "a photo BREAK of a cat").embeds
    assert split.shape == (1, 154, 32)
    assert_close(split[:, 77:], encode_prompt(sd15, "of a cat").embeds)


def test_encoder_dtype_is_kept() -> None:
    bundle = tiny.sd15_bundle()
    bundle.text_encoders[0].to(torch.bfloat16)  # type: ignore[arg-type]  # transformers wraps ``to`` untypably
    assert encode_prompt(bundle, "a (cat:1.2)").embeds.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("bad", "error"),
    [(0, ValueError), (-1, ValueError), (True, ValueError), (1.5, ValueError), (6, JobError)],
)
def test_bad_clip_skip_is_a_clear_error(sd15: TextEncoderBundle, bad: object, error: type[Exception]) -> None:
    """Not an integer >= 1: a caller's bug. More layers than this model has: the client's choice, a task failure
    with this message (a ``JobError``), not an internal error."""
    with pytest.raises(error, match="clip_skip"):
        encode_prompt(sd15, "a cat", clip_skip=bad)  # type: ignore[arg-type]


def test_bundle_shape_mismatch_is_a_clear_error(sd15: TextEncoderBundle) -> None:
    with pytest.raises(ValueError, match="SDXL needs 2"):
        encode_prompt(TextEncoderBundle(sd15.tokenizers, sd15.text_encoders, is_sdxl=True), "a cat")


# --- SDXL --------------------------------------------------------------------------------------------------


def test_sdxl_matches_diffusers_default(sdxl: TextEncoderBundle) -> None:
    reference, _, reference_pooled, _ = _sdxl_pipe(sdxl).encode_prompt(  # type: ignore[attr-defined]  # hidden by diffusers' lazy exports
        "a photo of a cat", device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    ours = encode_prompt(sdxl, "a photo of a cat")
    assert ours.embeds.shape == (1, 77, 32 + 64)
    assert ours.pooled is not None
    assert ours.pooled.shape == (1, 48)
    assert_close(ours.embeds, reference)
    assert_close(ours.pooled, reference_pooled)


def test_sdxl_ignores_clip_skip_by_default_like_a1111(sdxl: TextEncoderBundle) -> None:
    one, two = (encode_prompt(sdxl, "a photo of a cat", clip_skip=k) for k in (1, 2))
    assert torch.equal(one.embeds, two.embeds)


def test_sdxl_clip_l_skip_option_moves_only_clip_l(sdxl: TextEncoderBundle) -> None:
    pipe = _sdxl_pipe(sdxl)
    default = encode_prompt(sdxl, "a photo of a cat").embeds
    skipped = encode_prompt(sdxl, "a photo of a cat", clip_skip=3, sdxl_clip_l_skip=True).embeds
    # diffusers' SDXL clip_skip=k takes hidden_states[-(k + 2)]: its k=1 is our CLIP-L hidden_states[-3].
    reference, _, _, _ = pipe.encode_prompt(  # type: ignore[attr-defined]  # hidden by diffusers' lazy exports
        "a photo of a cat",
        device=torch.device("cpu"),
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        clip_skip=1,
    )
    assert_close(skipped[..., :32], reference[..., :32])
    assert_close(skipped[..., 32:], default[..., 32:])
    assert not torch.allclose(skipped[..., :32], default[..., :32])
    penultimate = encode_prompt(sdxl, "a photo of a cat", clip_skip=2, sdxl_clip_l_skip=True).embeds
    assert torch.equal(penultimate, default)


def test_sdxl_long_weighted_prompt_pools_the_first_chunk(sdxl: TextEncoderBundle) -> None:
    long = encode_prompt(sdxl, "cat " * 75 + "(dog:1.4) " * 20)
    first = encode_prompt(sdxl, "cat " * 75)
    assert long.embeds.shape == (1, 154, 96)
    assert long.pooled is not None
    assert first.pooled is not None
    assert_close(long.pooled, first.pooled)
    assert_close(long.embeds[:, :77], first.embeds)
    assert encode_prompt(sdxl, "cat BREAK dog").embeds.shape == (1, 154, 96)


# --- cond / uncond of different lengths ----------------------------------------------------------------------


def test_pad_to_same_length_appends_empty_chunks(sd15: TextEncoderBundle) -> None:
    cond = encode_prompt(sd15, "cat " * 160)
    uncond = encode_prompt(sd15, "blurry")
    empty = encode_prompt(sd15, "")
    padded_cond, padded_uncond = pad_to_same_length(cond, uncond, empty)
    assert padded_cond is cond
    assert padded_uncond.embeds.shape == (1, 231, 32)
    assert_close(padded_uncond.embeds[:, :77], uncond.embeds)
    assert_close(padded_uncond.embeds[:, 77:154], empty.embeds)
    assert_close(padded_uncond.embeds[:, 154:], empty.embeds)
    swapped_uncond, swapped_cond = pad_to_same_length(uncond, cond, empty)
    assert_close(swapped_uncond.embeds, padded_uncond.embeds)
    assert swapped_cond is cond


def test_pad_to_same_length_keeps_sdxl_pooled(sdxl: TextEncoderBundle) -> None:
    cond, uncond, empty = (encode_prompt(sdxl, p) for p in ("a BREAK b", "c", ""))
    _, padded = pad_to_same_length(cond, uncond, empty)
    assert padded.embeds.shape == cond.embeds.shape
    assert padded.pooled is uncond.pooled


def test_pad_to_same_length_rejects_mismatched_shapes() -> None:
    a = Conditioning(torch.zeros(1, 154, 8))
    with pytest.raises(ValueError, match="feature sizes"):
        pad_to_same_length(a, Conditioning(torch.zeros(1, 77, 4)), Conditioning(torch.zeros(1, 77, 8)))
    with pytest.raises(ValueError, match="non-multiple"):
        pad_to_same_length(a, Conditioning(torch.zeros(1, 70, 8)), Conditioning(torch.zeros(1, 77, 8)))


def test_encode_prompt_pair_pads_the_shorter_side(sd15: TextEncoderBundle) -> None:
    cond, uncond = encode_prompt_pair(sd15, "a photo BREAK of a cat", "blurry", clip_skip=2)
    assert cond.embeds.shape == uncond.embeds.shape == (1, 154, 32)
    assert_close(uncond.embeds[:, :77], encode_prompt(sd15, "blurry", clip_skip=2).embeds)
    assert_close(uncond.embeds[:, 77:], encode_prompt(sd15, "", clip_skip=2).embeds)
    same_cond, same_uncond = encode_prompt_pair(sd15, "a cat", "blurry")
    assert same_cond.embeds.shape == same_uncond.embeds.shape == (1, 77, 32)


def test_bad_expansions_are_clear_errors(sd15: TextEncoderBundle) -> None:
    tokenizer = sd15.tokenizers[0]
    with pytest.raises(JobError, match="at most 75 fit"):  # the client's embedding: a task failure
        tokenize_prompt(tokenizer, "a cat", token_expansions={"cat</w>": ["cat</w>"] * 76})
    with pytest.raises(ValueError, match="at least one token"):
        tokenize_prompt(tokenizer, "a cat", token_expansions={"cat</w>": []})
    with pytest.raises(ValueError, match="comma_padding_backtrack"):
        tokenize_prompt(tokenizer, "a cat", comma_padding_backtrack=-1)
