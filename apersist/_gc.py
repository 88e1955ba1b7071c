"""``apersist gc``: mark, then sweep, dated by gc's own clock.

A segment is *garbage* when no live commit names it and its epoch is older than the
newest commit's: its writer is fenced, so no commit will ever name it. Garbage stays
garbage: a writer's commit names only its own new segments (of its epoch, never older
than the newest commit's) and segments its live state already names, so nothing brings a
segment back once no live commit names it.

Nothing here trusts a writer's clock (the ``time_ms`` of commit and epoch records): a
writer whose clock ran behind made garbage look old enough to delete while readers still
needed it. Each gc run notes instead, in a marker object (``fmt.gc_marks_key``), when it
first saw each garbage segment, by its own clock; a later run deletes a segment only if it
is still garbage and a note dates it at least the grace period back. A reader that
opened the store before a segment became garbage has thus had the store open for at least
the grace period (as measured by gc's clocks) when the segment goes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from . import _format as fmt
from ._drivers import Driver, ObjectNotFoundError
from ._errors import CorruptDataError
from ._store import Store

__all__ = ["GcMarks", "GcPlan", "collect_garbage", "plan_gc", "read_marker"]

_MARKS_TYPE = "gc-marks"


@dataclass(frozen=True, slots=True)
class GcMarks:
    """The marker: when a gc run first saw each garbage segment of one writer.

    ``marks`` maps a segment key to the gc clock's reading (ms since the Unix epoch) at the
    first run that found it garbage. Stored as checked JSON like commit and epoch records.
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
        prefix = fmt.segments_prefix(writer)
        for segment, seen in marks.items():
            if (not segment.startswith(prefix) or not isinstance(seen, int)
                    or isinstance(seen, bool) or seen < 0):
                raise CorruptDataError(f"gc marker has a malformed mark: key={key} offset=0 "
                                       f"segment={segment}")
        return cls(writer, marks)


@dataclass(frozen=True, slots=True)
class GcPlan:
    """What one gc run found, and what it deletes and keeps marked.

    ``due``: garbage that a note dates at least ``grace_ms`` back (every garbage segment when
    ``grace_ms`` is 0): deleted. ``waiting``: the rest of the garbage, each with the time
    it was first seen (ms, gc's clock): what the marker holds after the run. ``new``: the
    keys this run saw as garbage for the first time (in ``due`` or ``waiting``).
    ``damaged_marker``: why the stored marker was ignored (it failed its checks), if it was.
    """

    now_ms: int
    grace_ms: int
    due: tuple[str, ...]
    waiting: Mapping[str, int]
    new: tuple[str, ...]
    marker_changed: bool
    damaged_marker: str | None = None


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
        # Starting over only postpones deletion (every segment is first seen again now),
        # so a damaged marker never makes gc delete early; it is reported, and replaced.
        return {}, str(exc)
    return ({} if marker is None else dict(marker.marks)), None


async def _garbage(store: Store, driver: Driver, writer: str) -> list[str]:
    """Segments that no live commit names, of epochs older than the newest commit's."""
    named = {seg.ref.key for kind in fmt.KINDS for name in store.log_names(kind)
             for seg in store.segments(kind, name)}
    # gc refuses a store whose writer-role records are damaged, as it refuses a damaged log.
    epoch_prefix = fmt.epochs_prefix(writer)
    async for info in driver.list(epoch_prefix):
        number = fmt.number_in_key(info.key, epoch_prefix)
        if number is not None:
            await store.read_epoch(number)
    # Segments of the newest commit's epoch are left alone: they may be the uploads of a
    # commit in flight, which would name them.
    current = store.last_epoch_of_log
    prefix = fmt.segments_prefix(writer)
    garbage = []
    async for info in driver.list(prefix):
        parsed = fmt.parse_segment_key(info.key, writer)
        if info.key not in named and parsed is not None and parsed[0] < current:
            garbage.append(info.key)
    return garbage


async def plan_gc(driver: Driver, *, grace_ms: int, now_ms: int) -> GcPlan:
    """Find the garbage and decide what a gc run at ``now_ms`` deletes; write nothing.

    ``now_ms`` is gc's own clock (ms since the Unix epoch). A segment is due when the
    marker dates its first sighting ``grace_ms`` or more before ``now_ms``; one seen for
    the first time is dated ``now_ms``, so it is due at once only with ``grace_ms`` 0. A
    note dated after ``now_ms`` (this clock was set back since) counts as seen now.
    Raises what loading the store raises (``CorruptDataError`` for a damaged log), and
    ``ValueError`` for a negative ``grace_ms``.
    """
    if grace_ms < 0:
        raise ValueError(f"the grace period must not be negative: grace_ms={grace_ms}")
    store = Store(driver, writer=fmt.WRITER, clock_ms=lambda: now_ms)
    await store.load()
    marks, damaged = await _read_marks(driver, fmt.WRITER)
    due: list[str] = []
    waiting: dict[str, int] = {}
    new: list[str] = []
    for key in await _garbage(store, driver, fmt.WRITER):
        seen = marks.get(key)
        if seen is None or seen > now_ms:
            seen = now_ms
            new.append(key)
        if now_ms - seen >= grace_ms:
            due.append(key)
        else:
            waiting[key] = seen
    # Marks of segments that are gone (deleted, by an earlier run or by hand) are dropped.
    changed = damaged is not None or waiting != marks
    return GcPlan(now_ms, grace_ms, tuple(due), waiting, tuple(new), changed, damaged)


async def collect_garbage(driver: Driver, *, grace_ms: int, now_ms: int,
                          dry_run: bool = False) -> GcPlan:
    """One gc run: mark the garbage first seen now, delete the garbage that is due.

    See ``plan_gc``. The marker (only the ``waiting`` segments) is written before anything
    is deleted, whole (a plain put replaces it atomically): a run that fails half-way has
    at worst left a due segment unmarked, which the next run marks again, so a failure only
    ever postpones a deletion. With ``dry_run`` nothing is written or deleted: the plan
    says what would be.
    """
    plan = await plan_gc(driver, grace_ms=grace_ms, now_ms=now_ms)
    if dry_run:
        return plan
    if plan.marker_changed:
        await driver.put(fmt.gc_marks_key(fmt.WRITER), GcMarks(fmt.WRITER, plan.waiting).encode())
    if plan.due:
        await driver.delete(list(plan.due))
    return plan
