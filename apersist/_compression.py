"""Segment body compression: which codec a segment's body is stored with, and the codec itself.

Nothing here touches storage; only ``compress_off_loop`` awaits. The writer decides
per segment whether compressing pays (``compress_body``); a reader decompresses what the
segment's header names (``decompress_body``), refusing anything it cannot trust. Both
run on the event loop for small bodies and in worker threads for big ones (zstd releases
the GIL), which is why compressor and decompressor objects are kept one per thread:
``zstandard`` documents its instances as unsafe to use from two threads at once.
"""

from __future__ import annotations

import threading
from typing import Final

import anyio.to_thread
import zstandard

from ._concurrency import brisk_thread_switching
from ._errors import CorruptDataError

__all__ = ["CODECS", "ZSTD", "Compression", "compress_body", "compress_off_loop",
           "decompress_body"]

#: The one codec this format knows, as the segment header's ``codec`` field names it.
ZSTD: Final = "zstd"
CODECS: Final = frozenset({ZSTD})
#: zstd's compression levels (negative "fast" levels are left out: they trade the size
#: this feature is for).
MIN_LEVEL: Final = 1
MAX_LEVEL: Final = 22
DEFAULT_LEVEL: Final = 3

#: The highest level whose compressors are kept, one per thread. A compressor keeps the
#: working memory of the biggest body it compressed: after an 8 MiB body, 3 MiB at level
#: 3, 14 MiB at 9, 44 MiB at 12, 89 MiB at 19 and 137 MiB at 22 (zstandard's
#: ``memory_size()``), in each of the worker threads (up to anyio's 40) and the loop thread
#: that ever compressed at that level. Above this level a compressor is made for each body:
#: that costs about 40 µs, nothing beside those levels' milliseconds per 64 KiB.
MAX_KEPT_LEVEL: Final = 9

#: Bodies smaller than this are stored raw: a zstd frame's own header and checksum (about
#: 13 bytes) would eat what little compressing a handful of records saves.
MIN_COMPRESS_BYTES: Final = 128

#: Bodies at least this big are compressed in a worker thread. zstd level 3 compresses a
#: few hundred MB/s, so 64 KiB costs the loop a fraction of a millisecond inline, about
#: what a thread hop costs; bigger bodies would stall it.
THREAD_COMPRESS_BYTES: Final = 64 << 10

#: The largest decompressed body a reader accepts. A frame declares its content size up
#: front; one that claims more than this is refused before any memory is allocated, so a
#: damaged or hostile segment cannot make a reader allocate gigabytes (a "bomb"). A writer
#: cuts segments at ``Config.max_segment_bytes`` (64 MiB by default) of raw records, and
#: merges at most a few of them, so real bodies stay far below.
MAX_BODY_BYTES: Final = 1 << 30


class Compression:
    """How a writer stores segment bodies: ``codec`` (None: raw) at ``level``."""

    __slots__ = ("codec", "level")

    def __init__(self, codec: str | None, level: int = DEFAULT_LEVEL) -> None:
        self.codec = codec
        self.level = level

    def __repr__(self) -> str:
        return f"Compression(codec={self.codec!r}, level={self.level})"


#: What a writer uses when nobody said otherwise (``Config``'s defaults).
DEFAULT: Final = Compression(ZSTD, DEFAULT_LEVEL)
#: Bodies stored raw (``Config(compression=None)``, and tools that copy records as they are).
RAW: Final = Compression(None)

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``. The content size goes in the frame header
    (so a reader can bound and size its output before decompressing) and zstd's own
    checksum at its end (a second check, after the segment's body CRC, of what was
    decompressed)."""
    if level > MAX_KEPT_LEVEL:
        # Made for this body and dropped after it: kept, it would hold its working memory
        # for the thread's life, in every worker thread that ever compressed.
        return zstandard.ZstdCompressor(level=level, write_checksum=True,
                                        write_content_size=True)
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if by_level is None:
        by_level = _local.compressors = {}
    compressor = by_level.get(level)
    if compressor is None:
        compressor = by_level[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor."""
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def compress_body(body: bytes | bytearray | memoryview,
                  compression: Compression) -> tuple[bytes | None, str | None]:
    """``(stored bytes, codec)`` for a segment body, or ``(None, None)`` when it is best
    stored raw: no codec configured, a tiny body, or one that compressing does not make
    smaller (already-compressed values, say). The caller keeps ``body`` in the last case,
    so no copy of it is made."""
    if compression.codec is None or not MIN_COMPRESS_BYTES <= len(body) <= MAX_BODY_BYTES:
        # Beyond MAX_BODY_BYTES (one record of a GiB or more) readers would refuse the
        # frame as a bomb: such a body is stored raw.
        return None, None
    stored = _compressor(compression.level).compress(body)
    if len(stored) >= len(body):
        return None, None
    return stored, compression.codec


async def compress_off_loop(body: bytes | bytearray,
                            compression: Compression) -> tuple[bytes | None, str | None]:
    """``compress_body`` without stalling the event loop: a big body is compressed in a
    worker thread (zstd releases the GIL while it works), a small one inline."""
    if compression.codec is None or len(body) < MIN_COMPRESS_BYTES:
        return None, None
    if len(body) < THREAD_COMPRESS_BYTES:
        return compress_body(body, compression)
    with brisk_thread_switching():
        return await anyio.to_thread.run_sync(compress_body, body, compression)


def decompress_body(key: str, offset: int, codec: str, stored: bytes | memoryview) -> bytes:
    """The raw body (framed records) of a segment stored with ``codec``.

    ``offset`` is where the stored body starts in the segment, for messages. The stored
    bytes passed the segment's body CRC already; what can still be wrong is a writer's
    bug or deliberate damage (the CRC recomputed): a frame that does not decode, lies
    about its size, or declares a size no writer produces. Each is ``CorruptDataError``.
    """
    if codec != ZSTD:
        raise CorruptDataError(f"segment body codec is unknown: key={key} offset={offset} "
                               f"codec={codec!r}")
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise CorruptDataError(f"segment body is not a zstd frame: key={key} offset={offset} "
                               f"error={exc}") from None
    if declared < 0:  # -1: size not recorded; our writers always record it
        raise CorruptDataError(f"segment body's zstd frame does not declare its size: key={key} "
                               f"offset={offset}")
    if declared > MAX_BODY_BYTES:
        raise CorruptDataError(f"segment body's zstd frame declares an implausible size: "
                               f"key={key} offset={offset} size={declared} limit={MAX_BODY_BYTES}")
    try:
        # allow_extra_data=False: bytes after the frame are damage, not something to skip.
        raw = _decompressor().decompress(stored, max_output_size=declared,
                                         allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CorruptDataError(f"segment body does not decompress: key={key} offset={offset} "
                               f"error={exc}") from None
    if len(raw) != declared:
        raise CorruptDataError(f"segment body's decompressed size differs from its frame's: "
                               f"key={key} offset={offset} size={len(raw)} expected={declared}")
    return raw
