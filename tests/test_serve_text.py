"""The server's streaming text pieces: incremental detokenization and stop strings, in any split (hypothesis)."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from nemojax.cli import default_model_path
from nemojax.serve.textstream import Detokenizer, StopMatcher
from nemojax.tokenizer import Tokenizer

TOK = Tokenizer(default_model_path())


def _splits(n: int, seed: int) -> list[int]:
    """Random cut points 0 < c < n, sorted, plus the ends."""
    rng = random.Random(seed)
    return [0] + sorted(rng.sample(range(1, n), rng.randint(0, n - 1))) + [n] if n > 1 else [0, n]


def _detok(ids: list[int], seed: int) -> list[str]:
    d, cuts = Detokenizer(TOK.decode), _splits(len(ids), seed)
    return [d.push(ids[a:b]) for a, b in zip(cuts, cuts[1:])] + [d.flush()]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40), st.integers(0, 99))
def test_detokenized_pieces_join_to_the_text_and_never_split_a_character(text, seed):
    ids = TOK.encode(text)
    pieces = _detok(ids, seed)
    assert "".join(pieces) == TOK.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in p for p in pieces)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, TOK.vocab_size - 1), max_size=30), st.integers(0, 99))
def test_any_token_ids_join_to_their_decoding(ids, seed):
    assert "".join(_detok(ids, seed)) == TOK.decode(ids)


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the output ends: the start of the stop occurrence that ends first (ties: the longest)."""
    ends = [(i + len(s), i) for s in stops for i in range(len(text)) if text.startswith(s, i)]
    return min(ends)[1] if ends else None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab c", max_size=30), st.lists(st.text(alphabet="ab c", min_size=1, max_size=4),
                                                       max_size=3), st.integers(0, 99))
def test_stop_strings_cut_at_the_first_match_in_any_split(text, stops, seed):
    m, cuts = StopMatcher(stops), _splits(len(text), seed)
    out, matched = [], False
    for a, b in zip(cuts, cuts[1:]):
        piece, matched = m.push(text[a:b])
        out.append(piece)
        if matched:
            break
    if not matched:
        out.append(m.flush())
    first = _first_stop(text, stops)
    assert matched == (first is not None)
    assert "".join(out) == (text if first is None else text[:first])


def test_a_split_multibyte_character_is_held_until_complete():
    ids = TOK.encode("a🙂b")
    d = Detokenizer(TOK.decode)
    got = [d.push([i]) for i in ids]
    assert "".join(got) + d.flush() == "a🙂b"
    assert got[0] == "a" and any(g == "" for g in got[1:]) and "🙂" in "".join(got)
