"""Packs of token sequences: flatten(), and the int32 wire form a worker process reads."""

from __future__ import annotations

import numpy as np
import pytest

from embedd_server.engines.packing import decode_pack, encode_pack, flatten


def _message(*values: int) -> bytes:
    return np.array(values, dtype=np.int32).tobytes()


def test_flatten_concatenates_tokens_and_keeps_each_length() -> None:
    tokens, lengths = flatten([[2, 4, 3], [2, 3], range(10, 14)])
    assert tokens.dtype == lengths.dtype == np.int32
    assert tokens.tolist() == [2, 4, 3, 2, 3, 10, 11, 12, 13]
    assert lengths.tolist() == [3, 2, 4]


def test_flatten_refuses_an_empty_sequence() -> None:
    with pytest.raises(ValueError, match="empty token sequence"):
        flatten([[2, 3], []])


@pytest.mark.parametrize(
    "sequences",
    [
        [[7]],
        [[2, 4, 3], [2, 3], [1] * 128],
        [[0, 2**31 - 1], [5]],  # the whole int32 range of token ids survives
    ],
)
def test_a_pack_round_trips(sequences: list[list[int]]) -> None:
    message = encode_pack(sequences)
    assert message[:4] == _message(len(sequences))  # [n, lengths..., tokens...]
    tokens, lengths = decode_pack(message)
    assert lengths.tolist() == [len(ids) for ids in sequences]
    assert tokens.tolist() == [token for ids in sequences for token in ids]
    expected_tokens, expected_lengths = flatten(sequences)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(lengths, expected_lengths)


def test_the_wire_form_is_count_then_lengths_then_tokens() -> None:
    assert encode_pack([[2, 4, 3], [9]]) == _message(2, 3, 1, 2, 4, 3, 9)


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(_message(0), id="no sequences"),
        pytest.param(_message(-1, 1, 5), id="a negative count"),
        pytest.param(_message(1, 2, 5, 6, 7), id="more tokens than the lengths say"),
        pytest.param(_message(2, 3, 1, 5, 6), id="fewer tokens than the lengths say"),
        pytest.param(_message(2, 0, 2, 5, 6), id="a sequence of length 0"),
        pytest.param(_message(2, -1, 3, 5, 6), id="a negative length"),
        pytest.param(_message(3, 1, 1), id="a count past the end of the message"),
    ],
)
def test_malformed_packs_are_refused(message: bytes) -> None:
    with pytest.raises(ValueError, match="malformed pack"):
        decode_pack(message)


def test_a_message_cut_inside_a_value_is_refused() -> None:
    with pytest.raises(ValueError):
        decode_pack(encode_pack([[2, 4, 3]])[:-1])


@pytest.mark.parametrize(
    "message", [_message(1), _message(3), b""], ids=["[1]", "[3]", "empty message"]
)
def test_a_message_without_its_lengths_is_refused(message: bytes) -> None:
    with pytest.raises(ValueError, match="malformed pack"):
        decode_pack(message)
