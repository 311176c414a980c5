"""The file order handed to pytest-xdist (tests/support/schedule.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support.schedule import SECONDS, longest_first

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Item:
    nodeid: str


def test_every_listed_file_exists() -> None:
    """A renamed or deleted file would silently lose its place at the front."""
    missing = [name for name in SECONDS if not (ROOT / name).is_file()]
    assert missing == []


def test_listed_files_first_longest_first_then_most_tests_first_each_file_kept_in_order() -> None:
    longest, second = sorted(SECONDS, key=lambda f: -SECONDS[f])[:2]
    items = [
        Item("tests/a_test.py::one"),
        Item(f"{second}::x"),
        Item("tests/b_test.py::one"),
        Item("tests/b_test.py::two[p1]"),
        Item(f"{longest}::y"),
        Item(f"{second}::w"),
        Item("tests/a_test.py::zero"),
        Item("tests/c_test.py::one"),
        Item("tests/a_test.py::three"),
    ]
    assert [i.nodeid for i in longest_first(items)] == [
        f"{longest}::y",
        f"{second}::x",
        f"{second}::w",
        "tests/a_test.py::one",
        "tests/a_test.py::zero",
        "tests/a_test.py::three",
        "tests/b_test.py::one",
        "tests/b_test.py::two[p1]",
        "tests/c_test.py::one",
    ]


def test_the_run_hands_files_out_in_that_order() -> None:
    """scripts/test keeps pytest-xdist from re-sorting the files by their number of tests."""
    script = (ROOT / "scripts" / "test").read_text()
    assert "--dist loadfile --no-loadscope-reorder" in script
