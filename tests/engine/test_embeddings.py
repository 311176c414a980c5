"""Textual inversion: .pt / .safetensors / SDXL pair, multi-vector, prompt vs negative, the unmentioned rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tests.support import adapter_pipes as tiny

from underpaint.demo import adapters as demo
from underpaint.engine.adapters.embeddings import (
    EmbeddingManager,
    EmbeddingPlan,
    is_negative_embedding,
    read_embedding_file,
)
from underpaint.engine.job import JobError
from underpaint.registry import ModelEntry

transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]

PROMPT = "a photo of a cat"


def _run(loaded: tiny.TinyLoaded, plan: EmbeddingPlan) -> np.ndarray:
    # diffusers' own prompt encoder does not expand multi-vector tokens from a mapping: write them out.
    return tiny.run(loaded, plan.expand(plan.prompt), plan.expand(plan.negative_prompt))


@pytest.fixture
def models(tmp_path: Path) -> Path:
    ti = tmp_path / "textualinversion"
    demo.save_a1111_embedding_pt(ti / "subject.pt", demo.random_vectors(3, 32, 1))
    demo.save_a1111_embedding_safetensors(ti / "texture.safetensors", demo.random_vectors(2, 32, 2))
    demo.save_a1111_embedding_safetensors(ti / "EasyNegative.safetensors", demo.random_vectors(2, 32, 3))
    demo.save_sdxl_embedding(ti / "xlstyle.safetensors", demo.random_vectors(2, 32, 4), demo.random_vectors(2, 64, 5))
    return tmp_path


def _entry(models: Path, name: str) -> ModelEntry:
    return tiny.resolve(models, "textualinversion", name)


def test_vectors_land_in_the_text_encoder_rows(models: Path) -> None:
    loaded = tiny.sd15()
    plan = EmbeddingManager().apply(loaded, [_entry(models, "subject.pt")], "a subject", "")
    tokens = next(iter(plan.token_expansions.values()))
    assert len(tokens) == 3
    assert plan.prompt == f"a {tokens[0]}"
    ids = loaded.pipe.tokenizer.convert_tokens_to_ids(tokens)
    rows = loaded.pipe.text_encoder.get_input_embeddings().weight[ids]
    assert torch.equal(rows, read_embedding_file(models / "textualinversion" / "subject.pt").clip_l)
    # One tokenizer id per vector token, in order: multi-vector expansion is exact.
    assert loaded.pipe.tokenizer(plan.expand(plan.prompt)).input_ids[2:5] == ids


def test_token_in_prompt_vs_negative_and_prompts_without_it_stay_byte_identical(models: Path) -> None:
    loaded = tiny.sd15()
    base = tiny.run(loaded, PROMPT)
    manager = EmbeddingManager()
    entries = [_entry(models, "subject"), _entry(models, "texture")]
    in_prompt = _run(loaded, manager.apply(loaded, entries, f"{PROMPT}, (subject:1.1), texture", ""))
    in_negative = _run(loaded, manager.apply(loaded, entries, PROMPT, "subject, texture"))
    assert np.abs(in_prompt.astype(int) - base).mean() > 1.0
    assert np.abs(in_negative.astype(int) - base).mean() > 1.0
    assert np.abs(in_negative.astype(int) - in_prompt).mean() > 1.0
    # Loaded embeddings change nothing for a prompt that does not use them ...
    assert np.array_equal(tiny.run(loaded, PROMPT), base)
    # ... nor for one that writes their name without requesting them (as if never loaded).
    fresh = tiny.sd15()
    assert np.array_equal(tiny.run(loaded, f"{PROMPT}, subject"), tiny.run(fresh, f"{PROMPT}, subject"))
    plan = manager.apply(loaded, [], f"{PROMPT}, subject", "")
    assert plan.prompt == f"{PROMPT}, subject"
    assert plan.token_expansions == {}


def test_pt_and_safetensors_with_the_same_vectors_give_the_same_output(models: Path) -> None:
    vectors = demo.random_vectors(2, 32, 9)
    ti = models / "textualinversion"
    demo.save_a1111_embedding_pt(ti / "same_a.pt", vectors)
    demo.save_a1111_embedding_safetensors(ti / "same_b.safetensors", vectors)
    loaded = tiny.sd15()
    manager = EmbeddingManager()
    a = _run(loaded, manager.apply(loaded, [_entry(models, "same_a")], "same_a", ""))
    b = _run(loaded, manager.apply(loaded, [_entry(models, "same_b")], "same_b", ""))
    assert np.array_equal(a, b)


def test_sdxl_pair(models: Path) -> None:
    loaded = tiny.sdxl(models)
    base = tiny.run(loaded, PROMPT)
    manager = EmbeddingManager()
    plan = manager.apply(loaded, [_entry(models, "xlstyle")], f"{PROMPT}, xlstyle", "")
    tokens = plan.token_expansions[plan.prompt.rsplit(" ", 1)[-1]]
    file = read_embedding_file(models / "textualinversion" / "xlstyle.safetensors")
    for tokenizer, encoder, vectors in (
        (loaded.pipe.tokenizer, loaded.pipe.text_encoder, file.clip_l),
        (loaded.pipe.tokenizer_2, loaded.pipe.text_encoder_2, file.clip_g),
    ):
        ids = tokenizer.convert_tokens_to_ids(tokens)
        assert vectors is not None
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors)
    assert np.abs(_run(loaded, plan).astype(int) - base).mean() > 1.0
    assert np.array_equal(tiny.run(loaded, PROMPT), base)


def test_wrong_base_model(models: Path) -> None:
    manager = EmbeddingManager()
    with pytest.raises(JobError, match=r"SDXL embedding .* checkpoint tiny-sd15 is SD 1.5"):
        manager.apply(tiny.sd15(), [_entry(models, "xlstyle")], "x", "")
    with pytest.raises(JobError, match=r"SD 1.5 embedding; checkpoint tiny-sdxl is SDXL"):
        manager.apply(tiny.sdxl(models), [_entry(models, "subject")], "x", "")
    demo.save_a1111_embedding_pt(models / "textualinversion" / "wide.pt", demo.random_vectors(1, 768, 1))
    with pytest.raises(JobError, match=r"768-dim vectors; .* expects 32"):
        manager.apply(tiny.sd15(), [_entry(models, "wide")], "x", "")


def test_unmentioned_rule_places_negative_looking_embeddings_in_the_negative_prompt(models: Path) -> None:
    loaded = tiny.sd15()
    manager = EmbeddingManager()
    entries = [_entry(models, n) for n in ("subject", "EasyNegative", "texture")]
    plan = manager.apply(loaded, entries, PROMPT, "blurry")
    assert plan.display_prompt == f"{PROMPT}, subject, texture"
    assert plan.display_negative_prompt == "blurry, EasyNegative"
    assert plan.appended == {"subject": "prompt", "EasyNegative": "negative_prompt", "texture": "prompt"}
    # Appending is exactly writing the token yourself.
    written = manager.apply(loaded, entries, f"{PROMPT}, subject, texture", "blurry, EasyNegative")
    assert written.appended == {}
    assert np.array_equal(_run(loaded, plan), _run(loaded, written))
    # A token the user wrote stays where it is, even a negative-looking one in the prompt; empty texts get the token.
    placed = manager.apply(loaded, entries, "easynegative texture", "")
    assert placed.display_prompt == "easynegative texture, subject"
    assert placed.display_negative_prompt == ""
    empty = manager.apply(loaded, entries[:2], "", "")
    assert (empty.display_prompt, empty.display_negative_prompt) == ("subject", "EasyNegative")


@pytest.mark.parametrize(
    ("stem", "negative"),
    [
        ("EasyNegative", True),
        ("ng_deepnegative_v1_75t", True),
        ("badhandv4_16755", True),
        ("BadDream_53202", True),
        ("verybadimagenegative_v1.3", True),
        ("UnrealisticDream", True),
        ("FastNegativeV2", True),
        ("pureerosface_v1_5162", False),
        ("CharTurnerV2", False),
        ("style-empire", False),
    ],
)
def test_negative_markers_in_names(stem: str, negative: bool) -> None:
    assert is_negative_embedding(stem) is negative


def test_file_metadata_can_mark_an_embedding_negative(models: Path) -> None:
    ti = models / "textualinversion"
    demo.save_a1111_embedding_pt(ti / "style7.pt", demo.random_vectors(1, 32, 6), name="style7-negative")
    from safetensors.torch import save_file

    save_file({"emb_params": demo.random_vectors(1, 32, 7)}, str(ti / "plain8.safetensors"), {"negative": "true"})
    demo.save_a1111_embedding_safetensors(ti / "plain9.safetensors", demo.random_vectors(1, 32, 8))
    plan = EmbeddingManager().apply(
        tiny.sd15(), [_entry(models, n) for n in ("style7", "plain8", "plain9")], PROMPT, ""
    )
    assert plan.appended == {"style7": "negative_prompt", "plain8": "negative_prompt", "plain9": "prompt"}


def test_slots_are_bounded_and_reused(models: Path) -> None:
    loaded = tiny.sd15()
    manager = EmbeddingManager(max_vectors_per_pipe=4)
    names = ["subject", "texture", "EasyNegative"]  # 3 + 2 + 2 vectors: never all resident at once
    first: dict[str, np.ndarray] = {}
    for round_ in range(2):
        for name in names:
            plan = manager.apply(loaded, [_entry(models, name)], f"{PROMPT}, {name}", "")
            assert len(loaded.pipe.tokenizer) <= 49408 + 4
            assert loaded.pipe.text_encoder.get_input_embeddings().num_embeddings <= 49408 + 4
            image = _run(loaded, plan)
            if round_ == 0:
                first[name] = image
            else:  # evicted, reloaded into other slots: same bytes
                assert np.array_equal(image, first[name])
    assert manager.file_loads == 6


def test_bad_requests(models: Path) -> None:
    ti = models / "textualinversion"
    (ti / "broken.pt").write_bytes(b"garbage")
    demo.save_a1111_embedding_safetensors(ti / "subject.safetensors", demo.random_vectors(1, 32, 1))
    manager = EmbeddingManager()
    with pytest.raises(JobError, match=r"broken.pt could not be read"):
        manager.apply(tiny.sd15(), [_entry(models, "broken")], "", "")
    with pytest.raises(JobError, match="share the token 'subject'"):
        manager.apply(tiny.sd15(), [_entry(models, "subject.pt"), _entry(models, "subject.safetensors")], "", "")
    with pytest.raises(JobError, match="at most 5"):
        manager.apply(tiny.sd15(), [_entry(models, "texture")] * 6, "", "")


def test_demo_set_with_the_real_loader_and_prompt_encoder(tiny_models_dir: Path, tmp_path: Path) -> None:
    """The plan's texts and token_expansions through conditioning.encode_prompt: each vector token is one position,
    the head expands to all vectors, and the result equals encoding the written-out tokens."""
    from underpaint.engine.conditioning import TextEncoderBundle, encode_prompt

    models = tiny.demo_models(tiny_models_dir, tmp_path / "models")
    manager = EmbeddingManager()
    for checkpoint, names, vectors in (
        ("tiny-sd15.safetensors", ["tiny-subject-sd15", "tiny-easynegative-sd15.safetensors"], 3 + 2),
        ("tiny-sdxl.safetensors", ["tiny-negative-sdxl"], 2),
    ):
        loaded = tiny.load(models, checkpoint)
        bundle = TextEncoderBundle(list(loaded.tokenizers), list(loaded.text_encoders), loaded.is_sdxl)
        base = encode_prompt(bundle, "a cat").embeds
        plan = manager.apply(loaded, [_entry(models, n) for n in names], "a cat", "")
        assert sum(len(t) for t in plan.token_expansions.values()) == vectors
        both = plan.prompt + ", " + plan.negative_prompt
        with_map = encode_prompt(bundle, both, token_expansions=plan.token_expansions).embeds
        written = encode_prompt(bundle, plan.expand(both)).embeds
        assert torch.equal(with_map, written)
        assert not torch.equal(encode_prompt(bundle, plan.negative_prompt).embeds, encode_prompt(bundle, "").embeds)
        assert torch.equal(encode_prompt(bundle, "a cat").embeds, base)
