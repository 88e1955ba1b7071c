"""``apersist gc``: delete what no checkpoint or live commit needs; mark, then sweep,
dated by gc's own clock.

gc loads the store as a reader does (from the newest checkpoint, ``Store.load``) and
finds five kinds of garbage:

1. **Segments** that no live commit (nor the checkpoint) names, of an epoch older than
   the newest commit's, or of that epoch and numbered at most ``Store.last_segment``: a
   commit named them once and a later one merged, retained or superseded them away (a
   table's snapshot supersedes its older deltas and snapshots), or they are uploads of a
   commit that never landed. Garbage stays garbage: a writer's commit names only its own
   new segments (of its epoch, numbered above every segment of that epoch a commit named
   before: a commit's segments are numbered when it is built, and commits are made one at
   a time) and segments its live state already names, so nothing brings a segment back
   once no live commit names it. A higher number of the newest commit's epoch may be an
   upload of a commit in flight, which will name it: it is left alone.
2. **Commit records** folded into the checkpoint the store was loaded from (numbered at or
   below ``Store.checkpoint_seq``): a reader starts from that checkpoint and lists only the
   commits after it. **Fence commits are kept for good** (``Store.fences``: the first commit
   of every epoch). They are the boundary that fences a zombie: a writer of epoch ``e``
   commits under the number after its own newest commit, which is of epoch ``e``; once a
   newer writer took over, the commit under that number is of a newer epoch, so it is the
   first commit of its epoch, a fence commit. Kept, it makes the zombie's create-if-absent
   fail (``FencedError``) however much else was collected; had it been deleted, the
   zombie's commit would land under a number that readers no longer read, and be lost
   although acknowledged. **The home of a live inline segment is kept too** (format 5.0:
   a small commit carries its segments' bytes in its record, ``SegmentRef.home``): the
   record is that segment's only copy. Once no live commit names the segment (maintenance
   merged it into a segment of its own, retention dropped it, a reset or a table snapshot
   superseded it), its home is folded garbage like any other.
3. **Checkpoints** numbered below the one the store was loaded from: a reader starts from
   the newest one it lists (``Store.load``), so an older one (even one a fenced writer
   writes again after gc collected the commits that follow it) is never read.
4. **Scratch keys** ``_check/...`` left by the create-if-absent probe (``probe.py``).
5. **Temporary files** ``.tmp-*`` of the filesystem driver, left by a crash; only drivers
   that declare ``Capabilities.temporary_files`` have any (``list`` skips them, and
   ``list_temporary``/``delete_temporary`` reach them).

Epoch records are never garbage: a live commit's epoch needs its record, and the listed
numbers keep a new writer from taking an epoch number again.

Nothing here trusts a writer's clock (the ``time_ms`` of commit and epoch records): a
writer whose clock ran behind made garbage look old enough to delete while readers still
needed it. Each gc run notes instead, in a marker object (``fmt.gc_marks_key``), when it
first saw each garbage key, by its own clock; a later run deletes a key only if it is
still garbage and a note dates it at least the grace period back. A reader that opened
the store before a key became garbage has thus had the store open for at least the grace
period (as measured by gc's clocks) when the key goes; the same holds for a writer taking
over (between its load and its fence commit) and for a reader opening (between reading a
checkpoint and the commits after it). A scratch key or a temporary file says nothing of
the operation that made it, which may still be in progress (a probe, a put), so one is
never deleted at its first sighting, even with a grace period of 0: only once an earlier
run saw it too.

The deletions keep every state a reader could open valid: the old checkpoints go first,
then the folded commit records (every checkpoint left folds them), then the rest. The
checkpoint the store was loaded from is never deleted.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import _format as fmt
from ._concurrency import gather_bounded
from ._drivers import Driver, ObjectNotFoundError
from ._drivers.base import capabilities_of
from ._drivers.probe import SCRATCH_PREFIX
from ._errors import CorruptDataError
from ._store import Store

__all__ = ["GcMarks", "GcPlan", "collect_garbage", "plan_gc", "read_marker"]

_MARKS_TYPE = "gc-marks"
_TMP_PREFIX = ".tmp-"


#: Keys deleted by one driver call (a batch delete of S3 takes up to 1,000, of Azure 256),
#: and such calls at once.
_DELETE_CHUNK = 256
_DELETE_CALLS = 8


def _is_temporary(key: str) -> bool:
    """Whether ``key`` names a driver's temporary file (deleted with ``delete_temporary``)."""
    return key.rpartition("/")[2].startswith(_TMP_PREFIX)


def _phase(key: str) -> int:
    """When a key is deleted in a run: old checkpoints, then commit records, then the rest."""
    if _is_temporary(key):
        return 2
    return {"checkpoint": 0, "commit": 1}.get(fmt.key_kind(key), 2)


@dataclass(frozen=True, slots=True)
class GcMarks:
    """The marker: when a gc run first saw each garbage key of one writer's store.

    ``marks`` maps a key (under ``writers/<writer>/`` or ``_check/``) to the gc clock's
    reading (ms since the Unix epoch) at the first run that found it garbage. Stored as
    checked JSON like commit and epoch records.
    """

    writer: str
    marks: Mapping[str, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return fmt._encode_checked({
            "format": [fmt.FORMAT_MAJOR, fmt.FORMAT_MINOR], "type": _MARKS_TYPE,
            "writer": self.writer, "marks": dict(sorted(self.marks.items())),
        })

    @classmethod
    def decode(cls, key: str, data: bytes) -> GcMarks:
        """Check and read a marker; ``CorruptDataError`` names ``key`` if it is damaged."""
        body = fmt._decode_checked(key, data)
        if body.get("type") != _MARKS_TYPE:
            raise CorruptDataError(f"object is not a gc marker: key={key} offset=0")
        writer = fmt._field(key, body, "writer", str)
        marks = fmt._field(key, body, "marks", dict)
        prefixes = (fmt.writer_prefix(writer), SCRATCH_PREFIX)
        for marked, seen in marks.items():
            if (not marked.startswith(prefixes) or not isinstance(seen, int)
                    or isinstance(seen, bool) or seen < 0):
                raise CorruptDataError(f"gc marker has a malformed mark: key={key} offset=0 "
                                       f"marked={marked}")
        return cls(writer, marks)


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What one gc run found, and what it deletes and keeps marked.

    ``due``: garbage that a note dates at least ``grace_ms`` back (with ``grace_ms`` 0,
    every garbage key but a scratch key or temporary file seen for the first time), in the
    order of deletion: old checkpoints, folded commit records, then the rest. ``waiting``:
    the rest of the garbage, each with the time it was first seen (ms, gc's clock): what
    the marker holds after the run. ``new``: the keys this run saw as garbage for the first
    time (in ``due`` or ``waiting``). ``damaged_marker``: why the stored marker was ignored
    (it failed its checks), if it was. ``checkpoint_seq``: the checkpoint the store was
    loaded from (0: none), which folds the commit records in ``due``.
    """

    now_ms: int
    grace_ms: int
    due: tuple[str, ...]
    waiting: Mapping[str, int]
    new: tuple[str, ...]
    marker_changed: bool
    damaged_marker: str | None = None
    checkpoint_seq: int = 0


async def read_marker(driver: Driver, writer: str) -> GcMarks | None:
    """The gc marker of ``writer``, checked; None if gc never wrote one.

    Raises ``CorruptDataError`` (naming its key) if it is damaged or names another writer.
    """
    key = fmt.gc_marks_key(writer)
    try:
        data = await driver.get(key)
    except ObjectNotFoundError:
        return None
    marker = GcMarks.decode(key, data)
    if marker.writer != writer:
        raise CorruptDataError(f"gc marker names another writer: key={key} offset=0 "
                               f"writer={marker.writer}")
    return marker


async def _read_marks(driver: Driver, writer: str) -> tuple[dict[str, int], str | None]:
    """The stored marks (empty if there is no marker) and, if it was damaged, why."""
    try:
        marker = await read_marker(driver, writer)
    except CorruptDataError as exc:
        # Starting over only postpones deletion (every key is first seen again now), so a
        # damaged marker never makes gc delete early; it is reported, and replaced.
        return {}, str(exc)
    return ({} if marker is None else dict(marker.marks)), None


async def _garbage(store: Store, driver: Driver, writer: str) -> tuple[list[str], set[str]]:
    """The garbage of the loaded ``store`` (see the module's doc), and the part of it that
    a first sighting never deletes (scratch keys and temporary files)."""
    # gc refuses a store whose writer-role records are damaged, as it refuses a damaged log.
    epoch_prefix = fmt.epochs_prefix(writer)
    async for info in driver.list(epoch_prefix):
        number = fmt.number_in_key(info.key, epoch_prefix)
        if number is not None:
            await store.read_epoch(number)
    garbage: list[str] = []
    # Checkpoints older than the one loaded: a reader starts from that one or a newer one.
    loaded = store.checkpoint_seq
    prefix = fmt.checkpoints_prefix(writer)
    async for info in driver.list(prefix):
        number = fmt.number_in_key(info.key, prefix)
        if number is not None and number < loaded:
            garbage.append(info.key)
    # Commit records that checkpoint folds, but the fence commits (see the module's doc).
    if loaded:
        # The fences, and the homes of live inline segments (their only copy).
        kept = set(store.fences) | {fmt.number_in_key(home, fmt.commits_prefix(writer))
                                    for home in store.live_homes()}
        prefix = fmt.commits_prefix(writer)
        async for info in driver.list(prefix):
            number = fmt.number_in_key(info.key, prefix)
            if number is not None and number <= loaded and number not in kept:
                garbage.append(info.key)
    # Segments no live commit names and no commit in flight can name.
    live = store.live_keys()
    current, last = store.last_epoch_of_log, store.last_segment
    async for info in driver.list(fmt.segments_prefix(writer)):
        parsed = fmt.parse_segment_key(info.key, writer)
        if (info.key not in live and parsed is not None
                and (parsed[0] < current or (parsed[0] == current and parsed[1] <= last))):
            garbage.append(info.key)
    # Keys that tell nothing of the operation that made them: only seen twice, deleted.
    patient = [info.key async for info in driver.list(SCRATCH_PREFIX)]
    if capabilities_of(driver).temporary_files:
        temporary = await driver.list_temporary()  # type: ignore[attr-defined]
        patient += [info.key for info in temporary
                    if info.key.startswith((fmt.writer_prefix(writer), SCRATCH_PREFIX))]
    return garbage + patient, set(patient)


async def plan_gc(driver: Driver, *, grace_ms: int, now_ms: int) -> GcPlan:
    """Find the garbage and decide what a gc run at ``now_ms`` deletes; write nothing.

    ``now_ms`` is gc's own clock (ms since the Unix epoch). A key is due when the marker
    dates its first sighting ``grace_ms`` or more before ``now_ms``; one seen for the first
    time is dated ``now_ms``, so it is due at once only with ``grace_ms`` 0, and never if
    it is a scratch key or a temporary file. A note dated after ``now_ms`` (this clock was
    set back since) counts as seen now. Raises what loading the store raises
    (``CorruptDataError`` for a damaged log), and ``ValueError`` for a negative
    ``grace_ms``.
    """
    if grace_ms < 0:
        raise ValueError(f"the grace period must not be negative: grace_ms={grace_ms}")
    store = Store(driver, writer=fmt.WRITER, clock_ms=lambda: now_ms)
    await store.load()
    marks, damaged = await _read_marks(driver, fmt.WRITER)
    due: list[str] = []
    waiting: dict[str, int] = {}
    new: list[str] = []
    garbage, patient = await _garbage(store, driver, fmt.WRITER)
    for key in garbage:
        seen = marks.get(key)
        first = seen is None or seen > now_ms
        if seen is None or first:
            seen = now_ms
            new.append(key)
        if now_ms - seen >= grace_ms and not (first and key in patient):
            due.append(key)
        else:
            waiting[key] = seen
    due.sort(key=_phase)  # stable: listing order within a phase
    # Marks of keys that are gone (deleted, by an earlier run or by hand) are dropped.
    changed = damaged is not None or waiting != marks
    return GcPlan(now_ms, grace_ms, tuple(due), waiting, tuple(new), changed, damaged,
                  store.checkpoint_seq)


async def collect_garbage(driver: Driver, *, grace_ms: int, now_ms: int,
                          dry_run: bool = False) -> GcPlan:
    """One gc run: mark the garbage first seen now, delete the garbage that is due.

    See ``plan_gc``. The marker (only the ``waiting`` keys) is written before anything is
    deleted, whole (a plain put replaces it atomically): a run that fails half-way has at
    worst left a due key unmarked, which the next run marks again, so a failure only ever
    postpones a deletion. The due keys are deleted in three steps, each once the one
    before has returned: the old checkpoints, the folded commit records, the rest (so a
    reader that opens meanwhile finds a checkpoint that folds every commit record gone).
    With ``dry_run`` nothing is written or deleted: the plan says what would be.
    """
    plan = await plan_gc(driver, grace_ms=grace_ms, now_ms=now_ms)
    if dry_run:
        return plan
    if plan.marker_changed:
        await driver.put(fmt.gc_marks_key(fmt.WRITER), GcMarks(fmt.WRITER, plan.waiting).encode())
    for phase in (0, 1, 2):
        keys = [key for key in plan.due if _phase(key) == phase and not _is_temporary(key)]
        # Calls of at most _DELETE_CHUNK keys, a few at once: each call (and each of its
        # retries, bounded by the retry policy's attempt timeout) stays short however
        # much is collected; on a store that deletes slowly (Azurite at 20,000 blobs) one
        # call of 10,000 keys timed out. A phase ends before the next one starts.
        await gather_bounded([functools.partial(driver.delete, keys[i:i + _DELETE_CHUNK])
                              for i in range(0, len(keys), _DELETE_CHUNK)], _DELETE_CALLS)
    temporary = [key for key in plan.due if _is_temporary(key)]
    if temporary:
        await driver.delete_temporary(temporary)  # type: ignore[attr-defined]
    return plan
