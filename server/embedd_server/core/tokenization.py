"""Turning texts into the token ids a model's engine is fed.

Where the GGUF carries the model's Hugging Face ``tokenizer.json`` we tokenize with the
``tokenizers`` library: llama.cpp's built-in BERT tokenizer differs from it on some scripts
(a Korean sentence: 14 ids instead of 30, cosine 0.61 against sentence-transformers). GGUF
files without it fall back to llama.cpp's own tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenizers import Tokenizer as HFTokenizerImpl

from embedd_server.errors import InputTooLong, InvalidInput, NotImplementedFeature

# Truncation directions, as Hugging Face tokenizers (and TEI) name them: "right" cuts the end
# of the text (keeps its start), "left" cuts its start (keeps its end).
RIGHT = "right"
LEFT = "left"
DIRECTIONS = (RIGHT, LEFT)

# A text longer than this many characters per kept token (plus UNSETTLED_PIECES) is not
# tokenized whole: first only its start (its end, for left truncation), then twice as much
# each round, until enough of the tokens are known to be the whole text's (see
# settled_tokens). The guess only sets how many rounds that takes (English text has 4-5
# characters per token, CJK 1-2); it never changes the ids kept.
CHARS_PER_TOKEN_GUESS = 8
# The pieces (pre-tokenizer words) of a part that lie next to its cut may come out otherwise
# in the whole text: the cut can split a word, a run of spaces or a normalization sequence
# (NFC composition, a sentencepiece charsmap entry), or end a regex alternative early (GPT-2's
# "'re"). Each changes only characters within a few of the cut, so this many pieces, each of
# at least one normalized character, are left out of the count of tokens known.
UNSETTLED_PIECES = 8


@dataclass(frozen=True)
class TokenSpan:
    """One token of a text: its id, its string in the vocabulary, whether it is a special
    token the tokenizer added, and the characters of the text it covers (``start`` to
    ``stop``; nothing for a special token)."""

    id: int
    token: str
    special: bool
    start: int
    stop: int


class Tokenizer(Protocol):
    """What the service needs of a tokenizer."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids with special tokens, not truncated."""

    def encode_truncated(self, text: str, max_tokens: int, direction: str = RIGHT) -> list[int]:
        """Ids with special tokens, cut to at most max_tokens the way the model was trained:
        at the end (``right``, keeping the start) or at the start (``left``)."""

    def encode_bounded(
        self, texts: Sequence[str], max_tokens: int, direction: str = RIGHT
    ) -> list[Counted]:
        """Each text's ids as :meth:`encode_truncated` gives them, and its token count; a
        long text may be tokenized only in part, its count then a lower bound."""

    def id_to_token(self, token_id: int) -> str:
        """The token's text, for reading."""

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_tokens: int) -> TokenizedPairs:
        """Query/document pairs as a cross-encoder reads them: the tokenizer's pair template
        (``[CLS] q [SEP] d [SEP]``, ``<s> q </s></s> d </s>``), cut longest-first to at
        most ``max_tokens``, as transformers truncates; with where each pair's type-1 tokens
        begin."""

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenSpan]:
        """The tokens of a whole text, with where each lies in it (TEI's /tokenize)."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """The text of token ids (TEI's /decode)."""

    def prompt_length(self, prompt: str, max_tokens: int) -> int:
        """How many leading tokens of ``prompt + text`` are the prompt's, as
        sentence-transformers counts them for ``include_prompt: false``: the prompt's own ids
        (special tokens added, cut to ``max_tokens``), less a closing special token."""


class HuggingFaceTokenizer:
    """The model's own tokenizer.json through the Rust ``tokenizers`` library."""

    def __init__(self, tokenizer_json: str) -> None:
        self._full = HFTokenizerImpl.from_str(tokenizer_json)
        self._full.no_truncation()
        self._full.no_padding()
        self._truncating: dict[tuple[int, str], HFTokenizerImpl] = {}
        self._json = tokenizer_json

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._full.encode_batch(list(texts))
        return [encoding.ids for encoding in encodings]

    def encode_truncated(self, text: str, max_tokens: int, direction: str = RIGHT) -> list[int]:
        # encode_batch, not encode: only the batch call lets go of the GIL while it works, so
        # a long text does not stop every other thread (the event loop included).
        return list(self._truncating_to(max_tokens, direction).encode_batch([text])[0].ids)

    def encode_bounded(
        self, texts: Sequence[str], max_tokens: int, direction: str = RIGHT
    ) -> list[Counted]:
        """Ids exactly as tokenizing each whole text and truncating it gives them, each text
        (or part of it) tokenized once, its count from that same pass. A long text is not
        tokenized whole: its start (end, for ``left``) is tokenized in growing parts until more
        than the tokens kept are settled (:func:`settled_tokens`); those are the whole text's
        first (last) tokens, so that part, cut and framed with the special tokens, gives the
        same ids. Such a text's count is a lower bound (``exact`` False). Texts for which no
        part settles enough (e.g. megabytes of spaces) are tokenized whole."""
        specials = self._full.num_special_tokens_to_add(False)
        budget = max_tokens - specials  # the text's own tokens kept
        truncating = self._truncating_to(max_tokens, direction)
        found: dict[int, Counted] = {}
        first = (max(budget, 0) + UNSETTLED_PIECES) * CHARS_PER_TOKEN_GUESS
        pending = {i: first for i, text in enumerate(texts) if budget >= 1 and len(text) > first}
        while pending:
            parts = [_part(texts[i], chars, direction) for i, chars in pending.items()]
            encodings = self._full.encode_batch(parts, add_special_tokens=False)
            grown: dict[int, int] = {}
            for (index, chars), encoding in zip(pending.items(), encodings, strict=True):
                known = settled_tokens(encoding.word_ids, direction)
                if known > budget:
                    # Truncation and the template on this pass's tokens: what encoding the
                    # part with the truncating tokenizer gives, without tokenizing it again.
                    ids = truncating.post_process(encoding).ids
                    found[index] = Counted(ids, known + specials, exact=False)
                elif 2 * chars < len(texts[index]):
                    grown[index] = 2 * chars
            pending = grown
        whole = [i for i in range(len(texts)) if i not in found]
        for index, counted in zip(
            whole, self._whole([texts[i] for i in whole], truncating, specials), strict=True
        ):
            found[index] = counted
        return [found[i] for i in range(len(texts))]

    @staticmethod
    def _whole(texts: Sequence[str], truncating: HFTokenizerImpl, specials: int) -> list[Counted]:
        """Texts tokenized whole in one pass of the truncating tokenizer: an over-long text's
        count is its kept tokens plus those of its overflow (each overflow piece framed with
        the ``specials`` special tokens again)."""
        if not texts:
            return []
        return [
            Counted(e.ids, len(e.ids) + sum(len(o.ids) - specials for o in e.overflowing))
            for e in truncating.encode_batch(list(texts))
        ]

    def _truncating_to(self, max_tokens: int, direction: str = RIGHT) -> HFTokenizerImpl:
        # tokenizers truncates inside the template, so [CLS] and [SEP] stay where they are,
        # exactly as sentence-transformers does (and TEI for direction "left").
        tokenizer = self._truncating.get((max_tokens, direction))
        if tokenizer is None:
            tokenizer = HFTokenizerImpl.from_str(self._json)
            tokenizer.no_padding()
            tokenizer.enable_truncation(max_tokens, direction=direction)
            self._truncating[(max_tokens, direction)] = tokenizer
        return tokenizer

    def id_to_token(self, token_id: int) -> str:
        return self._full.id_to_token(token_id) or ""

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_tokens: int) -> TokenizedPairs:
        # The truncating tokenizer's strategy is longest_first, transformers' default.
        encodings = self._truncating_to(max_tokens).encode_batch(list(pairs))
        return TokenizedPairs(
            [list(e.ids) for e in encodings],
            [_second_segment(e.type_ids) for e in encodings],
            truncated=sum(1 for e in encodings if e.overflowing),
        )

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenSpan]:
        encoding = self._full.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        return [
            TokenSpan(token_id, token, bool(special), start, stop)
            for token_id, token, special, (start, stop) in zip(
                encoding.ids,
                encoding.tokens,
                encoding.special_tokens_mask,
                encoding.offsets,
                strict=True,
            )
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._full.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def prompt_length(self, prompt: str, max_tokens: int) -> int:
        encoding = self._truncating_to(max_tokens).encode_batch([prompt])[0]
        closing = bool(encoding.ids) and bool(encoding.special_tokens_mask[-1])
        return len(encoding.ids) - (1 if closing else 0)


class LlamaTokenizer:
    """llama.cpp's built-in tokenizer, for GGUF files without tokenizer.json."""

    def __init__(
        self,
        tokenize: Callable[[bytes], list[int]],
        detokenize: Callable[[int], str],
    ) -> None:
        self._tokenize = tokenize
        self._detokenize = detokenize

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._tokenize(text.encode("utf-8", "replace")) for text in texts]

    def encode_truncated(self, text: str, max_tokens: int, direction: str = RIGHT) -> list[int]:
        ids = self._tokenize(text.encode("utf-8", "replace"))
        if len(ids) <= max_tokens:
            return ids
        if direction == LEFT:  # keep the opening token (e.g. [CLS]/BOS) and the end
            return [ids[0], *ids[len(ids) - max_tokens + 1 :]]
        # Keep the closing special token (e.g. [SEP]/EOS) as a trained model expects it.
        return [*ids[: max_tokens - 1], ids[-1]]

    def encode_bounded(
        self, texts: Sequence[str], max_tokens: int, direction: str = RIGHT
    ) -> list[Counted]:
        # llama.cpp's tokenizer says nothing of words, so nothing tells where a part of a text
        # would settle: each text is tokenized whole (ctypes lets go of the GIL meanwhile).
        counted = []
        for ids in self.encode_batch(texts):
            kept = ids
            if len(ids) > max_tokens:
                if direction == LEFT:
                    kept = [ids[0], *ids[len(ids) - max_tokens + 1 :]]
                else:
                    kept = [*ids[: max_tokens - 1], ids[-1]]
            counted.append(Counted(kept, len(ids)))
        return counted

    def id_to_token(self, token_id: int) -> str:
        return self._detokenize(token_id)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], max_tokens: int) -> TokenizedPairs:
        raise NotImplementedFeature(
            f"{_NO_EXACT_TOKENIZER}, so its pair template is unknown and scores would be wrong; "
            f"{_REIMPORT}"
        )

    def spans(self, text: str, add_special_tokens: bool) -> list[TokenSpan]:
        raise NotImplementedFeature(
            f"{_NO_EXACT_TOKENIZER}, so where its tokens lie in a text and which are special "
            f"is unknown; the Tokenize RPC gives its token ids. {_REIMPORT}"
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        raise NotImplementedFeature(
            f"{_NO_EXACT_TOKENIZER}, so its ids cannot be decoded exactly; {_REIMPORT}"
        )

    def prompt_length(self, prompt: str, max_tokens: int) -> int:
        ids = self.encode_truncated(prompt, max_tokens)
        # The ids llama.cpp adds around any text: the empty text has only those.
        frame = self._tokenize(b"")
        closing = bool(frame) and bool(ids) and ids[-1] == frame[-1]
        return len(ids) - (1 if closing else 0)


_NO_EXACT_TOKENIZER = (
    "This model has no exact tokenizer (no tokenizer.huggingface.json, and none could be "
    "rebuilt from its vocabulary)"
)
_REIMPORT = "re-create the file with `embedd import` from the model's directory."


def _part(text: str, chars: int, direction: str) -> str:
    """The ``chars`` characters of ``text`` that truncation in ``direction`` keeps."""
    return text[len(text) - chars :] if direction == LEFT else text[:chars]


def settled_tokens(word_ids: Sequence[int | None], direction: str) -> int:
    """How many tokens of a part of a text are certainly the whole text's: counted from the
    end truncation keeps (the start for ``right``), all but those of the
    :data:`UNSETTLED_PIECES` pieces nearest the cut.

    Normalizers and pre-tokenizers are local (a character's normalization and the piece
    boundaries depend on the characters within a few of it) and the model encodes each piece
    alone (WordPiece, Unigram, BPE), so the pieces away from the cut are those of the whole
    text, and so are their tokens. ``word_ids`` are the part's tokens' pieces, special tokens
    not added (an added token in the text is a piece of its own)."""
    toward_cut = list(word_ids) if direction == RIGHT else list(reversed(word_ids))
    near: set[object] = set()
    unsettled = 0
    for position, word in zip(
        range(len(toward_cut) - 1, -1, -1), reversed(toward_cut), strict=True
    ):
        key: object = ("token", position) if word is None else word
        if key not in near:
            if len(near) == UNSETTLED_PIECES:
                break
            near.add(key)
        unsettled += 1
    return len(toward_cut) - unsettled


def _second_segment(type_ids: Sequence[int]) -> int:
    """The first position of token type 1 (the length when there is none)."""
    return next((i for i, kind in enumerate(type_ids) if kind == 1), len(type_ids))


@dataclass(frozen=True)
class Counted:
    """One text's ids, cut to a limit where it is over it, and its token count: exact, or
    (``exact`` False: only part of the text was tokenized) a lower bound."""

    ids: list[int]
    tokens: int
    exact: bool = True


@dataclass(frozen=True)
class Tokenized:
    """The ids fed to the engine and the count billed as usage."""

    sequences: list[list[int]]
    truncated: int = dataclasses.field(default=0, kw_only=True)  # inputs cut to the limit

    @functools.cached_property
    def lengths(self) -> list[int]:
        """Each sequence's token count, counted once (usage, metrics, limits and the split
        of token states all read it)."""
        return [len(ids) for ids in self.sequences]

    @functools.cached_property
    def token_count(self) -> int:
        return sum(self.lengths)


@dataclass(frozen=True)
class TokenizedPairs(Tokenized):
    """Query/document pairs' ids and, per pair, the first token of type 1 (its length when
    none is)."""

    token_type_starts: list[int]


@dataclass(frozen=True)
class Truncation:
    """Whether and how over-long inputs are cut, and how the caller's protocol turns it on."""

    enabled: bool = True
    direction: str = RIGHT
    # What the error for an over-long input tells the caller to do to have it cut, in its
    # protocol's words (e.g. 'send "truncate": true'); "" where the route cannot truncate.
    hint: str = ""


def too_long(
    index: int,
    tokens: int,
    limit: int,
    hint: str = "",
    *,
    param: str | None = None,
    at_least: bool = False,
) -> InputTooLong:
    """The error for an over-long input when truncation is off; ``at_least``: ``tokens`` is
    a lower bound (only the start of a long text was tokenized)."""
    remedy = f"shorten it, or {hint} to cut it to the limit" if hint else "shorten it"
    count = (
        f"at least {tokens} tokens (only its start was tokenized)"
        if at_least
        else f"{tokens} tokens"
    )
    return InputTooLong(
        f"Input {index} has {count}, more than the model's limit of {limit}; {remedy}.",
        param=param or f"input[{index}]",
        index=index,
        tokens=tokens,
        limit=limit,
        at_least=at_least,
    )


def tokenize_texts(
    tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int, truncation: Truncation
) -> Tokenized:
    """Tokenizes texts, truncating over-long ones or failing with InputTooLong. A long text is
    tokenized only as far as needed to know its kept ids exactly
    (:meth:`Tokenizer.encode_bounded`)."""
    sequences: list[list[int]] = []
    cut = 0
    counted = tokenizer.encode_bounded(texts, max_tokens, truncation.direction)
    for index, text in enumerate(counted):
        if text.tokens > max_tokens:
            if not truncation.enabled:
                raise too_long(
                    index, text.tokens, max_tokens, truncation.hint, at_least=not text.exact
                )
            cut += 1
        sequences.append(text.ids)
    return Tokenized(sequences, truncated=cut)


@dataclass(frozen=True)
class ForeignIds:
    """For routes where token ids usually come from another tokenizer (OpenAI's: tiktoken):
    the ids must carry the model's own special tokens, and the errors say ``hint``."""

    specials: tuple[list[int], list[int]]  # the ids every sequence starts and ends with
    hint: str


def special_tokens(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after every text ([CLS] and [SEP], BOS, EOS...):
    what the encodings of a few different one-word texts share at each end."""
    encodings = tokenizer.encode_batch(["a", "hello", "dog", "7"])
    shortest = min(len(ids) for ids in encodings)
    start = 0
    while start < shortest and len({ids[start] for ids in encodings}) == 1:
        start += 1
    end = 0
    while end < shortest - start and len({ids[-1 - end] for ids in encodings}) == 1:
        end += 1
    first = encodings[0]
    return first[:start], first[len(first) - end :]


class PromptLengths(Protocol):
    """What counting a prompt's leading tokens needs (a :class:`Tokenizer`, or the
    :class:`TokenizerFacts` that remember them)."""

    def prompt_length(self, prompt: str, max_tokens: int) -> int:
        """See :meth:`Tokenizer.prompt_length`."""


# Prompts whose lengths a loaded model remembers: its named prompts and the literal prompts
# callers send most; the least recently used is forgotten first.
PROMPTS_REMEMBERED = 64


class TokenizerFacts:
    """What a loaded model's tokenizer answers the same way on every request, worked out once
    per loaded model instead of per request: its special tokens (the frame a token-id request
    must carry), how many it adds to each text, and each prompt's length (a model pooling
    without its prompt). Safe to use from several threads."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._prompts: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._lock = threading.Lock()

    @functools.cached_property
    def specials(self) -> tuple[list[int], list[int]]:
        """The ids every sequence starts and ends with (:func:`special_tokens`)."""
        return special_tokens(self._tokenizer)

    @functools.cached_property
    def special_count(self) -> int:
        """How many special tokens the tokenizer adds to each text: all the empty text has."""
        return len(self._tokenizer.encode_batch([""])[0])

    def prompt_length(self, prompt: str, max_tokens: int) -> int:
        """:meth:`Tokenizer.prompt_length`, the prompt tokenized on its first use only."""
        key = (prompt, max_tokens)
        with self._lock:
            if (length := self._prompts.get(key)) is not None:
                self._prompts.move_to_end(key)
                return length
        length = self._tokenizer.prompt_length(prompt, max_tokens)  # not under the lock
        with self._lock:
            self._prompts[key] = length
            if len(self._prompts) > PROMPTS_REMEMBERED:
                self._prompts.popitem(last=False)
        return length


def check_token_ids(
    sequences: Sequence[Sequence[int]],
    vocab_size: int,
    max_tokens: int,
    truncation: Truncation,
    foreign: ForeignIds | None = None,
) -> Tokenized:
    """Validates pre-tokenized input: ids in the vocabulary (and with the model's special
    tokens where ``foreign`` says so), lengths within the limit."""
    checked: list[list[int]] = []
    hint = f" {foreign.hint}" if foreign else ""
    for index, ids in enumerate(sequences):
        if not ids:
            raise InvalidInput(f"Input {index} has no token ids.", param=f"input[{index}]")
        bad = next((i for i in ids if i < 0 or (vocab_size and i >= vocab_size)), None)
        if bad is not None:
            raise InvalidInput(
                f"Input {index} has token id {bad}, outside the model's vocabulary "
                f"(0..{vocab_size - 1}).{hint}",
                param=f"input[{index}]",
            )
        if foreign is not None:
            _check_specials(index, ids, foreign)
        if len(ids) <= max_tokens:
            checked.append(list(ids))
            continue
        if not truncation.enabled:
            raise too_long(index, len(ids), max_tokens, truncation.hint)
        kept = ids[len(ids) - max_tokens :] if truncation.direction == LEFT else ids[:max_tokens]
        checked.append(list(kept))
    return Tokenized(checked, truncated=sum(len(ids) > max_tokens for ids in sequences))


def _check_specials(index: int, ids: Sequence[int], foreign: ForeignIds) -> None:
    head, tail = foreign.specials
    if list(ids[: len(head)]) == head and (not tail or list(ids[-len(tail) :]) == tail):
        return
    raise InvalidInput(
        f"Input {index}'s token ids do not begin with {head} and end with {tail}, the special "
        "tokens the model's own tokenizer adds (the Tokenize RPC returns such ids), so they "
        f"are not this model's.{' ' + foreign.hint if foreign.hint else ''}",
        param=f"input[{index}]",
    )
