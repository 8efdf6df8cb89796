"""``embedd embed-file``: a file of texts into a .npy or .jsonl of vectors over one EmbedStream.

Memory stays flat however large the file: texts are read lazily, vectors written batch by batch
(memory-mapped .npy, or appended .jsonl) into ``OUTPUT.partial``, renamed once complete.
"""

from __future__ import annotations

import abc
import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedd import Client
    from embedd_server.compute.engine import FloatMatrix


class CommandError(Exception):
    """A failure the user can fix (a missing file, a bad line...): one line, exit 2."""


def json_rows(vectors: FloatMatrix) -> list[list[float]]:
    """Rows as Python floats printing as float32's shortest repr (0.1, not 0.10000000149)."""
    import numpy as np

    rows: list[list[float]] = vectors.astype(str).astype(np.float64).tolist()
    return rows


def embed_file(args: argparse.Namespace, client: Client) -> int:
    from tqdm import tqdm

    source: Path = args.input
    output: Path = args.output
    writer_kind = output.suffix.lower()
    if writer_kind not in (".npy", ".jsonl"):
        raise CommandError(f"{output}: OUTPUT must end in .npy or .jsonl")
    if not source.exists():
        raise CommandError(f"{source}: no such file")
    if not source.is_file():
        raise CommandError(f"{source}: not a file")
    total = _count_texts(source)
    if total == 0:
        raise CommandError(f"{source}: no texts (the file has no non-blank line)")
    texts = (
        _jsonl_texts(source, args.text_key)
        if source.suffix.lower() == ".jsonl"
        else _line_texts(source)
    )
    partial = output.with_name(output.name + ".partial")
    writer: _Writer = _NpyWriter(partial, total) if writer_kind == ".npy" else _JsonlWriter(partial)
    try:
        with tqdm(
            total=total, unit="text", desc=f"embedding {source.name}", file=sys.stderr
        ) as bar:
            for vectors in client.embed_stream(
                texts,
                batch_size=args.batch_size,
                model=args.model,
                dimensions=args.dimensions,
                timeout=args.timeout,
            ):
                writer.write(vectors)
                bar.update(len(vectors))
        writer.close()
        if writer.count != total:
            raise CommandError(
                f"{source} changed while it was read: {total} texts counted, "
                f"{writer.count} embedded"
            )
        partial.replace(output)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    print(
        f"wrote {writer.count} embeddings of {writer.dimensions} dimensions to {output}",
        file=sys.stderr,
    )
    return 0


def _count_texts(source: Path) -> int:
    """The number of non-blank lines: the progress bar's total and the .npy's rows."""
    with _open_text(source) as handle:
        return sum(1 for line in _decoded(source, handle) if line.strip())


def _line_texts(source: Path) -> Iterator[str]:
    """Each non-blank line of a text file, without its line ending."""
    with _open_text(source) as handle:
        for line in _decoded(source, handle):
            if line.strip():
                yield line.rstrip("\r\n")


def _jsonl_texts(source: Path, key: str) -> Iterator[str]:
    """The ``key`` field of each non-blank line of a .jsonl file; a bad line names itself."""
    with _open_text(source) as handle:
        for number, line in enumerate(_decoded(source, handle), 1):
            if not line.strip():
                continue
            where = f"{source}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CommandError(
                    f"{where}: not valid JSON ({exc.msg}, column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise CommandError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if key not in record:
                raise CommandError(f"{where}: no {key!r} field (choose it with --text-key)")
            text = record[key]
            if not isinstance(text, str):
                raise CommandError(f"{where}: field {key!r} is not a string")
            if not text:
                raise CommandError(f"{where}: field {key!r} is empty")
            yield text


def _open_text(source: Path) -> Any:
    return source.open(encoding="utf-8", newline="")


def _decoded(source: Path, lines: Any) -> Iterator[str]:
    """The lines of an open text file, a decoding failure named as a one-line error."""
    try:
        yield from lines
    except UnicodeDecodeError as exc:
        raise CommandError(f"{source}: not UTF-8 text ({exc.reason})") from None


class _Writer(abc.ABC):
    """Where embed-file puts vectors, batch after batch."""

    def __init__(self) -> None:
        self.count = 0
        self.dimensions = 0

    @abc.abstractmethod
    def write(self, vectors: FloatMatrix) -> None:
        """Appends a batch of vectors."""

    @abc.abstractmethod
    def close(self) -> None:
        """Finishes the output file."""


class _NpyWriter(_Writer):
    """A float32 .npy matrix, memory-mapped once the first batch tells the dimension."""

    def __init__(self, path: Path, rows: int) -> None:
        super().__init__()
        self._path = path
        self._rows = rows
        self._matrix: Any = None

    def write(self, vectors: FloatMatrix) -> None:
        from numpy.lib.format import open_memmap

        if self._matrix is None:
            self.dimensions = vectors.shape[1]
            self._matrix = open_memmap(
                self._path, mode="w+", dtype="float32", shape=(self._rows, self.dimensions)
            )
        end = self.count + len(vectors)
        if end > self._rows:
            raise CommandError(f"more texts than the {self._rows} counted: the input changed")
        self._matrix[self.count : end] = vectors
        self.count = end

    def close(self) -> None:
        if self._matrix is not None:
            self._matrix.flush()
            self._matrix = None  # unmaps the file


class _JsonlWriter(_Writer):
    """One ``{"index": i, "embedding": [...]}`` line per vector."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._handle = path.open("w", encoding="utf-8")

    def write(self, vectors: FloatMatrix) -> None:
        self.dimensions = vectors.shape[1]
        lines = [
            json.dumps({"index": self.count + offset, "embedding": row}) + "\n"
            for offset, row in enumerate(json_rows(vectors))
        ]
        self._handle.writelines(lines)
        self.count += len(lines)

    def close(self) -> None:
        self._handle.close()
