"""A1111 prompt attention syntax: ``(x)``, ``[x]``, ``(x:1.3)``, escapes and ``BREAK``.

Behaviour reproduced from AUTOMATIC1111 webui v1.6-1.8 (documented semantics, own implementation):

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by ``w``;
  nesting multiplies.
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` and ``\\\\`` are literal characters; any other backslash is dropped.
* A closing bracket without a matching opening bracket is literal text. Opening brackets that are never closed
  apply their multiplier to everything after them.
* ``:w)`` closes the innermost open round bracket with weight ``w`` (even when a square bracket was opened after
  it); without an open round bracket it is literal text. A ``:`` that is not followed by a number and ``)`` is
  literal text.
* The uppercase word ``BREAK`` becomes its own item ``("BREAK", -1.0)``. Like in A1111 it is a bracketed item
  too, so inside brackets its weight is multiplied and it stops being a chunk break (the encoder then treats it
  as the text "BREAK" with that weight).
* Adjacent items with equal weight are merged; an empty prompt gives ``[("", 1.0)]``.
"""

from __future__ import annotations

import re

from underpaint.engine.job import JobError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK_TEXT = "BREAK"
BREAK_WEIGHT = -1.0

# One lexical element of a prompt, tried left to right (order matters: escapes before brackets).
_LEXER = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\])              # escaped bracket or backslash: literal character
    | (?P<backslash>\\)                     # any other backslash: dropped
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # ":1.3)" closes a round bracket with an explicit weight
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+ | :)           # plain text; a lone ":" is text too
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


class PromptSyntaxError(JobError, ValueError):
    """The prompt cannot be parsed (only an explicit weight that is not a number, e.g. ``(x:1.2.3)``)."""


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into ``(text, weight)`` items; ``BREAK`` is ``("BREAK", -1.0)``."""
    items: list[list[str | float]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for item in items[start:]:
            item[1] = float(item[1]) * factor

    for match in _LEXER.finditer(text):
        kind = match.lastgroup
        if kind == "escape":
            items.append([match.group(0)[1], 1.0])
        elif kind == "backslash":
            continue
        elif kind == "open_round":
            round_open.append(len(items))
        elif kind == "open_square":
            square_open.append(len(items))
        elif kind == "weight" and round_open:
            scale_from(round_open.pop(), _parse_weight(match.group("weight"), match.group(0)))
        elif kind == "close_round" and round_open:
            scale_from(round_open.pop(), ROUND_MULTIPLIER)
        elif kind == "close_square" and square_open:
            scale_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            _append_text(items, match.group(0))

    for start in round_open:
        scale_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        scale_from(start, SQUARE_MULTIPLIER)

    return _merge_equal_weights([(str(t), float(w)) for t, w in items])


def _parse_weight(number: str, source: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise PromptSyntaxError(f"invalid attention weight {number!r} in {source!r}") from None


def _append_text(items: list[list[str | float]], text: str) -> None:
    """Append literal text, turning each BREAK word into its own marker item."""
    for index, part in enumerate(_BREAK.split(text)):
        if index > 0:
            items.append([BREAK_TEXT, BREAK_WEIGHT])
        items.append([part, 1.0])


def _merge_equal_weights(items: list[tuple[str, float]]) -> list[tuple[str, float]]:
    if not items:
        return [("", 1.0)]
    merged = [items[0]]
    for text, weight in items[1:]:
        if weight == merged[-1][1]:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


def is_break(item: tuple[str, float]) -> bool:
    """True for a BREAK marker that forces a new chunk (not one whose weight was changed by brackets)."""
    return item[0] == BREAK_TEXT and item[1] == BREAK_WEIGHT
