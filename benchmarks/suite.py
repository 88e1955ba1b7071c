"""Runs the selected workloads in one process and one event loop per workload group."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
from pathlib import Path
from typing import Any

from . import core
from .baselines import RecordFloor
from .common import (
    Report,
    Settings,
    Stores,
    guarded,
    load_average,
    log,
    machine_facts,
    make_values,
    workload_scope,
)
from .compression import section_compression
from .job import section_job
from .memory import section_memory
from .stall import section_stall
from .state import section_state

LOADED = 0.25  # a 1-minute load average above this share of the cores marks a loaded run


def judge_load(report: Report) -> None:
    """Mark the run as loaded when something besides the suite shared the machine.

    The load average at the start is other processes' alone. The one at the end also holds
    the suite's own: its process, and the S3 and Azure servers it runs last, keep up to two
    cores busy, so only what passes that allowance counts as somebody else's load.
    """
    cores = os.cpu_count() or 1
    start, end = report.machine["loadavg_at_start"][0], report.machine["loadavg_at_end"][0]
    report.notes.pop("loaded_machine", None)
    if start > LOADED * cores or end > LOADED * cores + 2:
        report.notes["loaded_machine"] = (f"1-minute load average {start} at start, {end} at end, "
                                          f"on {cores} cores")


def make_settings(args: argparse.Namespace, root: Path) -> Settings:
    return Settings(root=root, quick=args.quick, events=args.events, repeats=args.repeats,
                    batch=args.batch, streams=args.streams, commit_samples=args.commit_samples,
                    producers=args.producers, memory_events=args.memory_events,
                    table_sizes=args.table_sizes, state_keys=args.state_keys,
                    cache_calls=args.cache_calls,
                    backend_events=args.backend_events, backends=args.backends,
                    history_commits=args.history_commits, job_rows=args.job_rows,
                    peers=args.peers, latency_ms=args.latency_ms,
                    latency_history=args.latency_history)


async def record_replay(values: list[Any], floor: RecordFloor, settings: Settings, stores: Stores,
                        report: Report) -> None:
    log("warming up")
    await core.warm_up(values, floor, settings, stores, report)
    await core.section_record_replay(values, floor, settings, stores, report)


async def filesystem_workloads(settings: Settings, only: tuple[str, ...], stores: Stores,
                               report: Report) -> None:
    if "job" in only:  # the headline: first, on a clean heap
        with workload_scope(report, "job"):
            await guarded(report, "job", section_job(settings, stores, report))
    if {"record", "replay", "stall"} & set(only):
        log(f"building {settings.events:,} values")
        values = make_values(settings.events)
        # The inputs live for the whole run: keep them out of every collection, so that
        # apersist and its baselines are not charged for traversing them.
        gc.collect()
        gc.freeze()
        report.notes["gc"] = (f"enabled, default thresholds; the {settings.events:,} input values "
                              f"frozen out of collection (gc.freeze: {gc.get_freeze_count():,} objects)")
        if {"record", "replay"} & set(only):
            with workload_scope(report, "record + replay"):
                floor = RecordFloor(values)
                await guarded(report, "record + replay", record_replay(values, floor, settings, stores,
                                                                      report))
                del floor
        if "stall" in only:
            with workload_scope(report, "stall"):
                await guarded(report, "stall", section_stall(values, settings, stores, report))
        del values
        gc.unfreeze()
        gc.collect()
    if "compression" in only:
        with workload_scope(report, "compression"):
            await guarded(report, "compression", section_compression(settings, stores, report))
    if "commit" in only:
        with workload_scope(report, "commit latency"):
            await guarded(report, "commit latency", core.section_commit_latency(settings, stores, report))
    if "table" in only:
        with workload_scope(report, "table rebuild"):
            await guarded(report, "table rebuild", core.section_table(settings, stores, report))
    if "cached" in only:
        with workload_scope(report, "@cached"):
            await guarded(report, "@cached", core.section_cached(settings, stores, report))
    if "history" in only:
        with workload_scope(report, "history"):
            await guarded(report, "history", core.section_history(settings, stores, report))


def run_suite(args: argparse.Namespace, root: Path) -> Report:
    settings = make_settings(args, root)
    report = Report(settings=settings.to_json() | {"only": list(args.only)}, machine=machine_facts(root))
    stores = Stores(root)
    only: tuple[str, ...] = args.only
    if "filesystem" in settings.backends:
        asyncio.run(filesystem_workloads(settings, only, stores, report))
        # Each in child processes of its own (a clean heap per measurement).
        for workload, name, section in (("memory", "peak memory", section_memory),
                                        ("state", "table and cache state", section_state)):
            if workload not in only:
                continue
            with workload_scope(report, name):
                try:
                    section(settings, stores, report)
                except Exception as exc:  # keep the other workloads' results
                    log(f"{name} FAILED: {exc}")
                    report.errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:500]}")
    remote = tuple(b for b in settings.backends if b != "filesystem")
    if remote and {"backends", "latency"} & set(only):
        from .backends import run_backends, servers

        with workload_scope(report, "object stores"):
            try:
                with servers(remote, root, report) as unders:
                    asyncio.run(run_backends(unders, settings, report, sections="backends" in only))
            except Exception as exc:  # servers that did not start: keep the other results
                log(f"object stores FAILED: {exc}")
                report.errors.append(f"object stores: {type(exc).__name__}: {str(exc)[:500]}")
    report.machine["loadavg_at_end"] = load_average()
    judge_load(report)
    return report
