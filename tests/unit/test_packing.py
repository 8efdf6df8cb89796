"""Packs of token sequences: flatten(), the int32 wire form a worker process reads, and the
mean from per-sequence pooling starts (include_prompt: false)."""

from __future__ import annotations

import numpy as np
import pytest

from embedd_server.compute.pack import Pack, flatten, masked_means


def _message(*values: int) -> bytes:
    return np.array(values, dtype=np.int32).tobytes()


def encode_pack(
    sequences: list[list[int]],
    pooling_starts: list[int] | None = None,
    token_type_starts: list[int] | None = None,
    *,
    token_states: bool = False,
) -> bytes:
    """The wire bytes of the pack of ``sequences`` (what a process engine sends)."""
    pack = Pack.of(sequences, pooling_starts, token_type_starts, token_states=token_states)
    return bytes(pack.wire)


decode_pack = Pack.from_wire


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
    assert message[:4] == _message(len(sequences))  # [n, lengths, pool, types, tokens]
    pack = decode_pack(message)
    tokens, lengths, starts, types = (
        pack.tokens,
        pack.lengths,
        pack.pooling_starts,
        pack.token_type_starts,
    )
    assert not pack.token_states
    assert lengths.tolist() == [len(ids) for ids in sequences]
    assert starts.tolist() == [0] * len(sequences)
    assert types.tolist() == lengths.tolist()  # one segment each
    assert tokens.tolist() == [token for ids in sequences for token in ids]
    expected_tokens, expected_lengths = flatten(sequences)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(lengths, expected_lengths)


def test_the_wire_form_is_count_lengths_pooling_starts_type_starts_then_tokens() -> None:
    assert encode_pack([[2, 4, 3], [9]]) == _message(2, 3, 1, 0, 0, 3, 1, 2, 4, 3, 9)
    assert encode_pack([[2, 4, 3], [9]], [2, 1], [1, 0]) == _message(
        2, 3, 1, 2, 1, 1, 0, 2, 4, 3, 9
    )


def test_pooling_and_token_type_starts_round_trip() -> None:
    pack = decode_pack(encode_pack([[2, 4, 3], [9, 8]], [2, 0], [1, 2]))
    assert (pack.tokens.tolist(), pack.lengths.tolist()) == ([2, 4, 3, 9, 8], [3, 2])
    assert (pack.pooling_starts.tolist(), pack.token_type_starts.tolist()) == ([2, 0], [1, 2])


@pytest.mark.parametrize(
    "starts", [[4, 0], [-1, 0], [0]], ids=["past the end", "negative", "one short"]
)
def test_starts_outside_their_sequences_are_refused(starts: list[int]) -> None:
    with pytest.raises(ValueError, match="starts must lie"):
        encode_pack([[2, 4, 3], [9, 8]], starts)
    with pytest.raises(ValueError, match="starts must lie"):
        encode_pack([[2, 4, 3], [9, 8]], None, starts)


def test_masked_means_average_each_sequence_from_its_start() -> None:
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)  # tokens of [3 tokens], [2 tokens]
    means = masked_means(rows, Pack.of([[5, 6, 7], [8, 9]], [1, 0]))
    np.testing.assert_array_equal(means, [[3.0, 4.0], [7.0, 8.0]])  # rows 1-2; rows 3-4


def test_a_sequence_with_no_pooled_token_gets_the_zero_vector() -> None:
    rows = np.ones((3, 2), dtype=np.float32)
    means = masked_means(rows, Pack.of([[5, 6, 7]], [3]))
    np.testing.assert_array_equal(means, [[0.0, 0.0]])  # sum 0 over a count clamped to 1e-9


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(_message(0), id="no sequences"),
        # A negative count asks for token states; the most negative one leaves no room.
        pytest.param(_message(-(2**31), 1, 0, 1, 5), id="the most negative count"),
        pytest.param(_message(1, 2, 0, 2, 5, 6, 7), id="more tokens than the lengths say"),
        pytest.param(_message(2, 3, 1, 0, 0, 3, 1, 5, 6), id="fewer tokens than the lengths say"),
        pytest.param(_message(2, 0, 2, 0, 0, 0, 2, 5, 6), id="a sequence of length 0"),
        pytest.param(_message(2, -1, 3, 0, 0, 0, 3, 5, 6), id="a negative length"),
        pytest.param(_message(2, 1, 1, 2, 0, 1, 1, 5, 6), id="a pooling start past its sequence"),
        pytest.param(_message(2, 1, 1, -1, 0, 1, 1, 5, 6), id="a negative pooling start"),
        pytest.param(_message(2, 1, 1, 0, 0, 2, 1, 5, 6), id="a type start past its sequence"),
        pytest.param(_message(2, 1, 1, 0, 0, -1, 1, 5, 6), id="a negative type start"),
        pytest.param(_message(3, 1, 1, 0, 0, 0), id="a count past the end of the message"),
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


def test_a_token_states_pack_says_so_with_a_negative_count() -> None:
    message = encode_pack([[2, 4, 3], [2, 3]], token_states=True)
    assert message[:4] == _message(-2)
    pack = decode_pack(message)
    assert pack.token_states
    assert pack.lengths.tolist() == [3, 2]
    assert pack.tokens.tolist() == [2, 4, 3, 2, 3]
    assert not decode_pack(encode_pack([[2, 3]])).token_states


def test_a_pack_made_in_the_core_is_sent_as_its_own_values() -> None:
    pack = Pack.of([[2, 4, 3], [9, 8]], [1, 0], [3, 1])
    sent = np.frombuffer(pack.wire, dtype=np.int32)
    assert np.shares_memory(sent, pack.values)  # the bytes sent are the pack's own, no copy
    again = Pack.from_wire(bytes(pack.wire))
    assert again.tokens.tolist() == [2, 4, 3, 9, 8]
    assert (again.ends.tolist(), again.offsets.tolist()) == ([3, 5], [0, 3])
    assert again.pools_from_starts and again.two_segments
    assert again.sequences() == [[2, 4, 3], [9, 8]]
    assert not Pack.of([[2, 3]]).pools_from_starts and not Pack.of([[2, 3]]).two_segments
