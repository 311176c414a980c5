"""A1111 attention syntax: expected items derived by hand from A1111's documented rules."""

from __future__ import annotations

import pytest

from underpaint.engine.prompts import PromptSyntaxError, is_break, parse_prompt_attention

R = 1.1  # (x)
S = 1 / 1.1  # [x]

TABLE: list[tuple[str, list[tuple[str, float]]]] = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", R), (" word", 1.0)]),
    ("a (b:1.5) c", [("a ", 1.0), ("b", 1.5), (" c", 1.0)]),
    ("((word))", [("word", R * R)]),
    ("[word]", [("word", S)]),
    ("[[word]]", [("word", S * S)]),
    ("(word:0.5)", [("word", 0.5)]),
    ("(word: 1.3 )", [("word", 1.3)]),
    ("(word:-1)", [("word", -1.0)]),
    ("((word:1.5))", [("word", 1.5 * R)]),
    ("[(word:1.5)]", [("word", 1.5 * S)]),
    ("(a [b] c)", [("a ", R), ("b", R * S), (" c", R)]),
    ("(unbalanced", [("unbalanced", R)]),
    ("a [b", [("a ", 1.0), ("b", S)]),
    ("word) and b]", [("word) and b]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", R)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.3 * R * R),
            (" ", R),
            ("on", R * S),
            (" a ", R),
            ("hill", 0.5 * R),
            (", sun, ", R),
            ("sky", R**4),
            (".", R),
        ],
    ),
    (r"\(literal\]", [("(literal]", 1.0)]),
    (r"\((word)\)", [("(", 1.0), ("word", R), (")", 1.0)]),
    (r"a \\ b", [("a \\ b", 1.0)]),
    (r"a \x", [("a x", 1.0)]),
    ("x:1.3) y", [("x:1.3) y", 1.0)]),
    ("(a:b)", [("a:b", R)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("BREAKfast and break", [("BREAKfast and break", 1.0)]),
    ("(a BREAK b)", [("a", R), ("BREAK", -R), ("b", R)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), TABLE, ids=[p or "<empty>" for p, _ in TABLE])
def test_parse_table(prompt: str, expected: list[tuple[str, float]]) -> None:
    result = parse_prompt_attention(prompt)
    assert [text for text, _ in result] == [text for text, _ in expected]
    assert [weight for _, weight in result] == pytest.approx([weight for _, weight in expected])


def test_adjacent_equal_weights_merge_but_different_do_not() -> None:
    merged = parse_prompt_attention("(a)(b:1.1)")
    assert [text for text, _ in merged] == ["ab"]
    assert [weight for _, weight in merged] == pytest.approx([1.1])
    assert len(parse_prompt_attention("(a)(b:1.2)")) == 2


def test_invalid_explicit_weight_is_a_clear_error() -> None:
    with pytest.raises(PromptSyntaxError, match="invalid attention weight"):
        parse_prompt_attention("(word:1.2.3)")


def test_break_marker_only_with_its_own_weight() -> None:
    plain, bracketed = parse_prompt_attention("a BREAK b"), parse_prompt_attention("(a BREAK b)")
    assert is_break(plain[1])
    assert not is_break(bracketed[1])
