"""Texts and token ids to what the engine is fed: truncation, InputTooLong, vocabulary checks.

The fake tokenizer is word-level: [CLS]=2, words from 4 (hello=4, cat=7, dog=12), [SEP]=3,
unknown words [UNK]=1.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer as HFTokenizerImpl

from embedd_server.core import tokenization
from embedd_server.core.tokenization import (
    ForeignIds,
    HuggingFaceTokenizer,
    LlamaTokenizer,
    Tokenized,
    Truncation,
    check_token_ids,
    special_tokens,
    tokenize_texts,
)
from embedd_server.errors import InputTooLong, InvalidInput
from tests.fakes import fake_tokenizer_json

CLS, SEP, UNK = 2, 3, 1
HELLO, CAT, DOG = 4, 7, 12


@pytest.fixture(scope="module")
def hf() -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer(fake_tokenizer_json())


def _llama() -> LlamaTokenizer:
    """llama.cpp's tokenizer, faked: one id per byte of each word, between [CLS] and [SEP]."""

    def tokenize(text: bytes) -> list[int]:
        return [CLS, *(100 + len(word) for word in text.split()), SEP]

    return LlamaTokenizer(tokenize, lambda token_id: f"<{token_id}>")


# --- the Hugging Face tokenizer ------------------------------------------------------------------


def test_hf_tokenizer_adds_the_template_and_never_truncates_by_itself(
    hf: HuggingFaceTokenizer,
) -> None:
    assert hf.encode_batch(["hello cat", "zebra"]) == [[CLS, HELLO, CAT, SEP], [CLS, UNK, SEP]]
    long = hf.encode_batch(["hello " * 600])[0]
    assert len(long) == 602  # no limit of its own: truncation is the caller's decision
    assert [hf.id_to_token(i) for i in (CLS, HELLO, SEP)] == ["[CLS]", "hello", "[SEP]"]


def test_hf_truncation_keeps_the_closing_special_token(hf: HuggingFaceTokenizer) -> None:
    assert hf.encode_truncated("hello cat dog hello", 4) == [CLS, HELLO, CAT, SEP]
    assert hf.encode_truncated("hello cat dog hello", 5) == [CLS, HELLO, CAT, DOG, SEP]
    assert hf.encode_truncated("hello", 5) == [CLS, HELLO, SEP]  # short texts are kept whole
    # Truncating at one limit leaves the untruncated tokenizer (and other limits) alone.
    assert hf.encode_batch(["hello cat dog hello"])[0] == [CLS, HELLO, CAT, DOG, HELLO, SEP]


def test_hf_truncation_from_the_left_keeps_the_end_and_both_special_tokens(
    hf: HuggingFaceTokenizer,
) -> None:
    assert hf.encode_truncated("hello cat dog hello", 4, "left") == [CLS, DOG, HELLO, SEP]
    assert hf.encode_truncated("hello cat dog hello", 4) == [CLS, HELLO, CAT, SEP]


# --- llama.cpp's tokenizer ---------------------------------------------------------------------


def test_llama_truncation_keeps_the_last_token() -> None:
    tokenizer = _llama()
    assert tokenizer.encode_batch(["ab abc"]) == [[CLS, 102, 103, SEP]]
    assert tokenizer.encode_truncated("a ab abc abcd", 4) == [CLS, 101, 102, SEP]
    assert tokenizer.encode_truncated("a ab", 4) == [CLS, 101, 102, SEP]
    assert tokenizer.encode_truncated("a ab abc abcd", 4, "left") == [CLS, 103, 104, SEP]
    assert tokenizer.id_to_token(7) == "<7>"


def test_llama_tokenizer_survives_text_that_is_not_valid_utf8() -> None:
    # A lone surrogate (a broken UTF-16 pair from JSON) cannot be encoded as UTF-8.
    assert _llama().encode_batch(["ab \ud800"]) == [[CLS, 102, 101, SEP]]


# --- tokenize_texts: truncation or InputTooLong ---------------------------------------------------


def test_over_long_texts_are_truncated_to_the_limit(hf: HuggingFaceTokenizer) -> None:
    texts = ["hello", "hello cat dog hello cat", "cat dog"]
    tokenized = tokenize_texts(hf, texts, max_tokens=4, truncation=Truncation())
    assert tokenized.sequences == [[CLS, HELLO, SEP], [CLS, HELLO, CAT, SEP], [CLS, CAT, DOG, SEP]]
    assert tokenized.token_count == 3 + 4 + 4  # usage counts what was computed


def test_without_truncation_an_over_long_text_is_input_too_long(
    hf: HuggingFaceTokenizer,
) -> None:
    texts = ["cat dog", "hello cat dog hello cat"]
    off = Truncation(enabled=False)
    assert len(tokenize_texts(hf, texts[:1], max_tokens=4, truncation=off).sequences[0]) == 4
    with pytest.raises(InputTooLong) as caught:
        tokenize_texts(hf, texts, max_tokens=4, truncation=off)
    error = caught.value
    assert isinstance(error, InvalidInput)  # a client error, not a server one
    assert error.param == "input[1]"
    assert "Input 1 has 7 tokens" in error.message and "limit of 4" in error.message
    assert error.message.endswith("; shorten it.")  # no way to truncate: none suggested
    hinted = Truncation(enabled=False, hint='send "truncate": true')
    with pytest.raises(InputTooLong, match='or send "truncate": true to cut it to the limit'):
        tokenize_texts(hf, texts, max_tokens=4, truncation=hinted)


def test_a_long_text_is_tokenized_only_as_far_as_its_kept_ids(
    hf: HuggingFaceTokenizer,
) -> None:
    text = "hello cat dog " * 100_000  # 300,000 tokens
    for direction, kept in (("right", [HELLO, CAT, DOG]), ("left", [HELLO, CAT, DOG])):
        [counted] = hf.encode_bounded([text], 5, direction)
        assert counted.ids == [CLS, *kept, SEP] == hf.encode_truncated(text, 5, direction)
        assert not counted.exact  # only a part was tokenized: the count is a lower bound
        assert 5 < counted.tokens < 1_000
    short = hf.encode_bounded(["hello cat dog hello"], 5)[0]
    assert (short.ids, short.tokens, short.exact) == ([CLS, HELLO, CAT, DOG, SEP], 6, True)


def test_a_long_text_without_truncation_reports_a_lower_bound(hf: HuggingFaceTokenizer) -> None:
    with pytest.raises(InputTooLong) as caught:
        tokenize_texts(hf, ["cat " * 100_000], max_tokens=4, truncation=Truncation(False))
    assert "Input 0 has at least " in caught.value.message
    assert "tokens (only its start was tokenized), more than the model's limit of 4" in (
        caught.value.message
    )


def test_only_over_long_texts_count_as_truncated(hf: HuggingFaceTokenizer) -> None:
    texts = ["hello", "hello cat dog hello cat", "cat " * 10_000, "cat dog"]
    tokenized = tokenize_texts(hf, texts, max_tokens=4, truncation=Truncation())
    assert [len(ids) for ids in tokenized.sequences] == [3, 4, 4, 4]
    assert tokenized.truncated == 2


class _Counting:
    """A tokenizers.Tokenizer that notes every text it is asked to tokenize."""

    def __init__(self, inner: HFTokenizerImpl, seen: list[str]) -> None:
        self._inner = inner
        self._seen = seen

    def encode_batch(self, inputs: list[str], add_special_tokens: bool = True) -> object:
        self._seen.extend(inputs)
        return self._inner.encode_batch(inputs, add_special_tokens=add_special_tokens)

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> tuple[HuggingFaceTokenizer, list[str]]:
    """The fake HF tokenizer, and every text that any of its tokenizers.Tokenizer objects
    (the whole one and each truncating one) is asked to tokenize."""
    seen: list[str] = []

    def from_str(text: str) -> _Counting:
        return _Counting(HFTokenizerImpl.from_str(text), seen)

    monkeypatch.setattr(
        tokenization, "HFTokenizerImpl", type("Counted", (), {"from_str": staticmethod(from_str)})
    )
    return HuggingFaceTokenizer(fake_tokenizer_json()), seen


@pytest.mark.parametrize("direction", ["right", "left"])
def test_an_over_long_text_is_tokenized_once(
    counted: tuple[HuggingFaceTokenizer, list[str]], direction: str
) -> None:
    """Its kept ids and its count both come from one pass (the truncation's overflow), not
    from tokenizing it whole and then again with truncation."""
    tokenizer, seen = counted
    texts = ["hello", "hello cat dog"]
    tokenized = tokenize_texts(tokenizer, texts, 4, Truncation(direction=direction))
    kept = [HELLO, CAT] if direction == "right" else [CAT, DOG]
    assert tokenized.sequences == [[CLS, HELLO, SEP], [CLS, *kept, SEP]]
    assert tokenized.truncated == 1
    assert seen == texts  # each text once
    with pytest.raises(InputTooLong, match="Input 1 has 5 tokens"):  # the exact count
        tokenize_texts(tokenizer, texts, 4, Truncation(enabled=False))


def test_a_long_texts_settled_part_is_tokenized_once(
    counted: tuple[HuggingFaceTokenizer, list[str]],
) -> None:
    """A long text's part whose tokens settle gives its kept ids from that same pass."""
    tokenizer, seen = counted
    text = "hello cat dog " * 100_000
    [result] = tokenizer.encode_bounded([text], 5)
    assert result.ids == [CLS, HELLO, CAT, DOG, SEP] and not result.exact
    assert len(seen) == 1 and text.startswith(seen[0]) and len(seen[0]) < 1_000


# --- check_token_ids: pre-tokenized input ---------------------------------------------------------


def test_token_ids_within_the_vocabulary_and_limit_pass_as_lists() -> None:
    off = Truncation(enabled=False)
    tokenized = check_token_ids([(CLS, HELLO, SEP), [CLS, SEP]], 16, 4, truncation=off)
    assert tokenized == Tokenized([[CLS, HELLO, SEP], [CLS, SEP]])
    assert tokenized.token_count == 5


def test_over_long_token_ids_are_cut_or_refused() -> None:
    ids = [CLS, HELLO, CAT, DOG, SEP]
    cut = check_token_ids([ids], 16, 3, truncation=Truncation())
    assert cut.sequences == [[CLS, HELLO, CAT]] and cut.truncated == 1
    left = check_token_ids([ids], 16, 3, truncation=Truncation(direction="left"))
    assert left.sequences == [[CAT, DOG, SEP]]
    with pytest.raises(InputTooLong, match=r"Input 0 has 5 tokens.*limit of 3") as caught:
        check_token_ids([ids], 16, 3, truncation=Truncation(enabled=False))
    assert caught.value.param == "input[0]"


@pytest.mark.parametrize(
    ("sequences", "words"),
    [
        ([[CLS, SEP], []], ["Input 1 has no token ids"]),
        ([[CLS, 16, SEP]], ["Input 0 has token id 16", "(0..15)"]),
        ([[CLS], [-1]], ["Input 1 has token id -1"]),
    ],
)
def test_bad_token_ids_are_invalid_input(sequences: list[list[int]], words: list[str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        check_token_ids(sequences, 16, 8, truncation=Truncation())
    assert not isinstance(caught.value, InputTooLong)
    for word in words:
        assert word in caught.value.message


def test_an_unknown_vocabulary_size_checks_only_for_negative_ids() -> None:
    assert check_token_ids([[10**6]], 0, 8, truncation=Truncation()).sequences == [[10**6]]
    with pytest.raises(InvalidInput, match="token id -5"):
        check_token_ids([[-5]], 0, 8, truncation=Truncation())


# --- the prompt's length (include_prompt: false) -------------------------------------------------


def test_prompt_length_counts_the_opening_token_not_the_closing_one(
    hf: HuggingFaceTokenizer,
) -> None:
    assert hf.prompt_length("hello cat", 64) == 3  # [CLS] hello cat | [SEP]
    assert hf.prompt_length("hello cat dog", 3) == 2  # cut to [CLS] hello [SEP]
    assert _llama().prompt_length("hello cat", 64) == 3
    assert _llama().prompt_length("hello cat dog", 3) == 2


def test_a_tokenizer_without_a_closing_token_counts_every_prompt_token() -> None:
    open_ended = HuggingFaceTokenizer(fake_tokenizer_json(closing=False))
    assert open_ended.prompt_length("hello cat", 64) == 3  # [CLS] hello cat

    def tokenize(text: bytes) -> list[int]:
        return [CLS, *(100 + len(word) for word in text.split())]  # BOS only

    assert LlamaTokenizer(tokenize, str).prompt_length("hello cat", 64) == 3


def test_special_tokens_are_what_every_encoding_shares(hf: HuggingFaceTokenizer) -> None:
    assert special_tokens(hf) == ([CLS], [SEP])
    assert special_tokens(_llama()) == ([CLS], [SEP])


def test_foreign_ids_without_the_special_tokens_are_refused_with_the_hint() -> None:
    foreign = ForeignIds(([CLS], [SEP]), "Send the texts.")
    assert check_token_ids([[CLS, HELLO, SEP]], 16, 8, Truncation(), foreign).sequences == [
        [CLS, HELLO, SEP]
    ]
    with pytest.raises(InvalidInput, match=r"Input 1's token ids.*Send the texts\.$") as caught:
        check_token_ids([[CLS, SEP], [HELLO, CAT]], 16, 8, Truncation(), foreign)
    assert caught.value.param == "input[1]"
    with pytest.raises(InvalidInput, match=r"outside the model's vocabulary.*Send the texts\."):
        check_token_ids([[CLS, 99, SEP]], 16, 8, Truncation(), foreign)
    assert check_token_ids([[HELLO]], 16, 8, Truncation()).sequences == [[HELLO]]  # no check
