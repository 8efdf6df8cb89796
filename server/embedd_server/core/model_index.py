"""The model catalogue as an index: each ``<name>.gguf``'s metadata and sha256, read once per
version of the file (its size and modification time), never on the event loop.

A file's metadata took seconds to read with gguf's reader (it walks the whole vocabulary;
core.gguf_metadata now takes milliseconds), a file without tokenizer.json has its vocabulary
rebuilt to tell how it tokenizes, and its sha256 reads every byte. Done on the event loop, as
before this index, with a cache of 64 files, one listing or one request for an unknown model
froze every call of the server for as long as that took. The index reads and hashes in
worker threads; requests get what it holds:

- a look-up by name stats the model's file (no read) and reads it only when that version of
  the file is not indexed yet (a new or replaced file), in a thread, once for all callers;
- a listing that must be current (``/v1/models``, ``/api/tags``) waits for a scan that began
  after it asked: the directories are listed and stat-ed in a thread, new or changed files
  are read, removed ones dropped; concurrent listings share one scan;
- unknown-model errors and the "first model of this task" choice use the index as it is;
- digests are computed by a background task, one file at a time, and awaited by the routes
  that report them (Ollama's ``/api/tags`` and ``/api/ps``).

A background task rescans every :data:`SCAN_INTERVAL_S`, so a new file is usually read and
hashed before anyone asks for it. Everything but the reading and hashing runs on the event
loop, so the index's state needs no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedd_server.errors import ModelLoadError
from embedd_server.model.catalog import ModelInfo, read_model_info
from embedd_server.model.gguf_tokenizer import tokenizer_kind

log = logging.getLogger(__name__)

SCAN_INTERVAL_S = 2.0  # how often the background task rescans the model directories


@dataclass(frozen=True)
class FileStamp:
    """One version of a model file: where it is, its size and modification time."""

    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class IndexEntry:
    """A model file as the index read it: its metadata, or why it cannot be used."""

    stamp: FileStamp
    info: ModelInfo | None
    error: str = ""  # ModelLoadError's message when info is None


def read_indexed(path: Path) -> ModelInfo:
    """What the index keeps of a file: its metadata and how it tokenizes (for a file without
    tokenizer.json that means reading its vocabulary too). Blocking: run it in a thread."""
    info = read_model_info(path)
    return dataclasses.replace(info, tokenizer=tokenizer_kind(info))


def file_sha256(path: Path) -> str:
    """sha256 of a file, hex (hashlib releases the GIL while it hashes)."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def stamp_of(path: Path) -> FileStamp | None:
    """The file's stamp; None when it is not a regular file (or is gone)."""
    try:
        found = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return FileStamp(path, found.st_size, found.st_mtime_ns)


def list_model_files(directories: Sequence[Path]) -> dict[str, FileStamp]:
    """Every ``<name>.gguf`` of the directories by name, the first directory's file winning."""
    found: dict[str, FileStamp] = {}
    for directory in reversed(directories):  # later directories are overridden by earlier
        with contextlib.suppress(OSError), os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.endswith(".gguf") or entry.name.startswith("."):
                    continue
                stamp = stamp_of(Path(entry.path))
                if stamp is not None:
                    found[entry.name[: -len(".gguf")]] = stamp
    return found


class ModelIndex:
    """The models of ``directories`` (first match wins), read and hashed off the event loop.

    Call its coroutines on one event loop (the server's); ``start()`` begins the background
    rescans, ``close()`` ends them. Without ``start()`` it still answers, scanning on demand.
    ``read`` and ``digest`` are the blocking reader and hasher (run in threads)."""

    def __init__(
        self,
        directories: Callable[[], Sequence[Path]],
        *,
        read: Callable[[Path], ModelInfo] = read_indexed,
        digest: Callable[[Path], str] = file_sha256,
        interval_s: float = SCAN_INTERVAL_S,
    ) -> None:
        self._directories = directories
        self._read_file = read
        self._hash_file = digest
        self._interval_s = interval_s
        self._entries: dict[str, IndexEntry] = {}
        self._digests: dict[FileStamp, str] = {}
        self._reads: dict[FileStamp, asyncio.Future[IndexEntry]] = {}
        self._scan_lock: asyncio.Lock | None = None
        self._scans_started = 0
        self._scans_done = 0  # the number of the last scan that completed (0: none yet)
        self._hashed = asyncio.Event()  # set (and replaced) whenever digests change
        self._wake_hasher = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- what requests ask -------------------------------------------------------------------

    async def lookup(self, name: str) -> IndexEntry | None:
        """The entry of the file ``name`` means now; None when no directory has it.

        Stats the candidate files (no read); reads the file, in a thread, only when this
        version of it is not indexed yet."""
        stamp = next(
            (
                found
                for directory in self._directories()
                if (found := stamp_of(directory / f"{name}.gguf")) is not None
            ),
            None,
        )
        if stamp is None:
            return None
        entry = self._entries.get(name)
        if entry is not None and entry.stamp == stamp:
            return entry
        return await self._read(name, stamp)

    async def models(self, *, fresh: bool = False) -> list[ModelInfo]:
        """The usable models by name. ``fresh``: after a scan that began after this call
        (files added or removed just before are seen); else as indexed, after the first scan."""
        if fresh or not self._scans_done:
            await self.scan()
        return [entry.info for _, entry in sorted(self._entries.items()) if entry.info is not None]

    async def digest(self, info: ModelInfo) -> str:
        """sha256 of the file ``info`` was read from, hex; waits for the background hasher.
        "" when that version of the file is no longer indexed (replaced or removed)."""
        while True:
            stamp = self._stamp_of(info)
            if stamp is None:
                return ""
            if (found := self._digests.get(stamp)) is not None:
                return found
            self._start_hasher()
            self._wake_hasher.set()
            await self._hashed.wait()

    # --- scanning ----------------------------------------------------------------------------

    async def scan(self) -> None:
        """Brings the index up to date: lists and stats the directories in a thread, reads
        new and changed files, drops removed ones. Returns once a scan that began after the
        call has completed (callers arriving during a scan share the next one)."""
        ticket = self._scans_started
        if self._scan_lock is None:
            self._scan_lock = asyncio.Lock()
        async with self._scan_lock:
            if self._scans_done > ticket:
                return  # a scan that began after this call completed while it waited
            self._scans_started += 1
            number = self._scans_started
            listing = await asyncio.to_thread(list_model_files, self._directories())
            for name in self._entries.keys() - listing.keys():
                del self._entries[name]
            for name, stamp in sorted(listing.items()):
                entry = self._entries.get(name)
                if entry is None or entry.stamp != stamp:
                    await self._read(name, stamp)
            current = {entry.stamp for entry in self._entries.values()}
            for stale in self._digests.keys() - current:
                del self._digests[stale]
            self._scans_done = number
        self._start_hasher()
        self._wake_hasher.set()

    async def _read(self, name: str, stamp: FileStamp) -> IndexEntry:
        """Reads one version of a file in a thread (once, whoever asks) and indexes it."""
        pending = self._reads.get(stamp)
        if pending is None:
            pending = asyncio.ensure_future(self._read_entry(stamp))
            self._reads[stamp] = pending
            pending.add_done_callback(lambda _: self._reads.pop(stamp, None))
        entry = await asyncio.shield(pending)
        self._entries[name] = entry
        return entry

    async def _read_entry(self, stamp: FileStamp) -> IndexEntry:
        # One broken file must not hide the others: it is indexed with what is wrong with it.
        try:
            info = await asyncio.to_thread(self._read_file, stamp.path)
        except ModelLoadError as exc:
            message = exc.message
        except Exception:
            log.exception("reading %s failed", stamp.path)
            message = (
                f"{stamp.path.name} is not a readable GGUF file; re-create it with `embedd import`."
            )
        else:
            return IndexEntry(stamp, info)
        log.warning("skipping %s: %s", stamp.path.name, message)
        return IndexEntry(stamp, None, message)

    def _stamp_of(self, info: ModelInfo) -> FileStamp | None:
        entry = self._entries.get(info.name)
        if entry is None or entry.info != info:
            return None
        return entry.stamp

    # --- background work ---------------------------------------------------------------------

    def start(self) -> None:
        """Starts the background rescans and hashing (call on the event loop)."""
        if not any(task.get_name() == "model-index-scan" for task in self._tasks):
            self._tasks.append(_spawn(self._scan_forever(), "model-index-scan"))
        self._start_hasher()

    def _start_hasher(self) -> None:
        if not any(task.get_name() == "model-index-hash" for task in self._tasks):
            self._tasks.append(_spawn(self._hash_forever(), "model-index-hash"))

    async def _scan_forever(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:  # a directory that cannot be read now may be readable later
                log.exception("scanning the model directories failed")
            await asyncio.sleep(self._interval_s)

    async def _hash_forever(self) -> None:
        while True:
            await self._wake_hasher.wait()
            self._wake_hasher.clear()
            for name in sorted(self._entries):
                entry = self._entries.get(name)
                if entry is None or entry.info is None or entry.stamp in self._digests:
                    continue
                await self._hash(entry.stamp)

    async def _hash(self, stamp: FileStamp) -> None:
        """Hashes one version of a file. A file that changed while it was hashed gets ""
        for the old version (its new version is read and hashed as a new entry)."""
        try:
            hexdigest = await asyncio.to_thread(self._hash_file, stamp.path)
            if await asyncio.to_thread(stamp_of, stamp.path) != stamp:
                hexdigest = ""
        except Exception:
            log.exception("cannot hash %s", stamp.path)
            hexdigest = ""
        self._digests[stamp] = hexdigest
        self._notify_hashed()

    def _notify_hashed(self) -> None:
        """Wakes every digest() waiter (each re-checks, then waits on a fresh event)."""
        done, self._hashed = self._hashed, asyncio.Event()
        done.set()

    async def close(self) -> None:
        """Stops the background tasks."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _spawn(coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coroutine, name=name)
