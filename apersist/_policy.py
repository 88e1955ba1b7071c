"""What a run does under its (persistence_mode, snapshot_access) pair, decided in one place."""

from __future__ import annotations

from dataclasses import dataclass

from ._config import Config, PersistenceMode, SnapshotAccess

__all__ = ["Policy"]


@dataclass(frozen=True, slots=True)
class Policy:
    """Flags derived from a ``Config``; everything else reads these instead of the enums."""

    writer: bool           # take the writer role (an epoch and a fence commit) at all
    replay: bool           # streams replay what is stored
    record_events: bool    # stream events are written
    offsets_load: bool     # stored offsets are read (stream.offset, a source's resume point)
    offsets_persist: bool  # recorded offsets are written
    tables_load: bool      # tables are rebuilt from the store
    tables_persist: bool   # table deltas are written
    cache_use: bool        # @cached consults and fills a cache at all
    cache_load: bool       # the cache is read from the store
    cache_persist: bool    # new cache entries are written
    reset: bool            # the first commit starts a new history
    realtime: bool         # replay keeps the recorded time gaps
    # How REALTIME_REPLAY paces: recorded gaps divided by the speed, then capped.
    realtime_speed: float = 1.0
    realtime_max_gap_ms: int | None = None

    @classmethod
    def of(cls, config: Config) -> Policy:
        access, mode = config.snapshot_access, config.persistence_mode
        writes = access is not SnapshotAccess.REPLAY
        reads = access in (SnapshotAccess.FULL, SnapshotAccess.REPLAY)
        data = access is not SnapshotAccess.OFFSETS_ONLY
        if mode is PersistenceMode.UDF_CACHING:
            # Sources and tables pass through; only the cache persists.
            return cls(writer=writes, replay=False, record_events=False,
                       offsets_load=False, offsets_persist=False,
                       tables_load=False, tables_persist=False, cache_use=data,
                       cache_load=data and reads, cache_persist=data and writes,
                       reset=access is SnapshotAccess.RECORD, realtime=False)
        return cls(
            writer=writes,
            replay=reads,
            record_events=writes and data,
            offsets_load=access is not SnapshotAccess.RECORD,
            offsets_persist=writes,
            tables_load=reads,
            tables_persist=writes and data,
            cache_use=data,
            cache_load=data and reads,
            cache_persist=data and writes,
            reset=access is SnapshotAccess.RECORD,
            realtime=mode is PersistenceMode.REALTIME_REPLAY,
            realtime_speed=config.realtime_speed,
            realtime_max_gap_ms=config.realtime_max_gap_ms,
        )
