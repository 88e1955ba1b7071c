"""A test kit for apersist and for the storage drivers written for it.

- **Driver conformance suite.** Every storage driver must pass the checks in
  :data:`DRIVER_CHECKS`: the one shared suite that makes every layer above the drivers
  work on every backend unchanged. Run it from a test module by subclassing
  :class:`DriverConformance` and providing a ``driver`` fixture, or from anywhere with
  :func:`check_driver`. Each check takes a fresh, *empty* driver and leaves closing it to
  the caller.
- **FakeClock.** A manual clock to inject as ``clock_ms``, so tests of timing are
  deterministic.
- **FaultyDriver.** A driver wrapper that injects faults (lost responses, timeouts,
  throttling, permanent errors, latency, torn writes) at random but reproducibly from a
  seed, or on demand, and records each one, so every layer above the drivers can be
  tested against failure. It also *crashes* at named steps of a commit, of taking the
  writer role and of maintenance (:data:`CRASH_POINTS`): the process is killed there, or,
  in-process, the storage freezes as a kill would leave it.

- **The driver protocol**, its signals and its declared capabilities (:class:`Driver`,
  :class:`ObjectInfo`, :class:`ObjectExistsError`, :class:`ObjectNotFoundError`,
  :class:`TransientBackendError`, :class:`Capabilities`), so that a driver written outside
  apersist imports nothing private.

The kit is a package of private modules (``_conformance``, ``_clock``, ``_faults``), as
``trio.testing`` is; everything public is imported from here. None of it imports pytest:
it is importable wherever apersist is installed.
"""

from .._drivers.base import (
    Capabilities,
    Driver,
    ObjectExistsError,
    ObjectInfo,
    ObjectNotFoundError,
    TransientBackendError,
)
from ._clock import FakeClock
from ._conformance import DRIVER_CHECKS, DriverCheck, DriverConformance, check_driver
from ._faults import CRASH_POINTS, FAULT_KINDS, FaultyDriver, SimulatedCrash

__all__ = [
    "CRASH_POINTS",
    "DRIVER_CHECKS",
    "FAULT_KINDS",
    "Capabilities",
    "Driver",
    "DriverCheck",
    "DriverConformance",
    "FakeClock",
    "FaultyDriver",
    "ObjectExistsError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "SimulatedCrash",
    "TransientBackendError",
    "check_driver",
]
