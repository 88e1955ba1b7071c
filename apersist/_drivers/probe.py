"""Trust, but check, the store: does it honour create-if-absent?

Commits are atomic and fencing works only because, of several racing ``if_absent`` puts of
one key, exactly one wins. Real S3 and Azure honour that (``If-None-Match: *``,
``overwrite=False``), but some S3-compatible servers silently ignore the condition and let
every writer win (s3rver, older MinIO and Ceph releases): on such a store two writers would
both "commit" under one number, and one of them would lose data without a word. A run
therefore checks the store once, when it opens it for writing, before it writes anything.
"""

from __future__ import annotations

import logging
import uuid

import anyio

from .._errors import BackendError
from .base import Driver, ObjectExistsError

__all__ = ["SCRATCH_PREFIX", "verify_create_if_absent"]

logger = logging.getLogger("apersist")

#: Scratch keys of the check live here, outside every writer's keys (``writers/``); one is
#: deleted as soon as its check is over (a crash may leave one behind, which is harmless).
SCRATCH_PREFIX = "_check/"


#: Why the refusal matters, said before what to use instead.
_WHY = "without it apersist can neither make commits atomic nor fence an older writer"
#: What to use instead, by driver name: the refusal says what would work, not only what failed.
_REMEDIES = {
    "s3": ("use AWS S3 (conditional writes since August 2024) or an S3-compatible server "
           "release that honours If-None-Match: * on PutObject and CompleteMultipartUpload "
           "(upgrade the server, or ask its vendor), or store on Backend.azure or "
           "Backend.filesystem"),
    "azure": ("use Azure Blob Storage or Azurite, which honour If-None-Match: * on uploads "
              "and block-list commits, and make sure no proxy in between drops the header"),
}
_REMEDY = ("a driver's put(if_absent=True) must let exactly one of several racing creators "
           "win (see the driver protocol, and apersist.testing.check_driver)")


async def verify_create_if_absent(driver: Driver) -> None:
    """Race two ``if_absent`` puts of different bytes on a scratch key; require one winner.

    Passes when exactly one put succeeds, the other fails with ``ObjectExistsError``, and
    the stored bytes are the winner's; the scratch key is deleted either way. Otherwise
    raises ``BackendError("storage does not honour create-if-absent: ...")`` naming the
    driver and what to use instead. A backend failure during the check (after retries) propagates as it is.
    """
    key = f"{SCRATCH_PREFIX}{uuid.uuid4().hex}"
    token = uuid.uuid4().hex
    payloads = [f"apersist create-if-absent check: racer={i} token={token}".encode()
                for i in (0, 1)]
    try:
        problem = await _race(driver, key, payloads)
    except Exception:
        # The check could not be made (the backend failed): still try not to leave litter.
        await _delete_quietly(driver, key)
        raise
    await driver.delete([key])
    if problem is not None:
        raise BackendError(f"storage does not honour create-if-absent: {problem}; "
                           f"{_WHY}; {_REMEDIES.get(driver.name, _REMEDY)}: "
                           f"driver={driver.name} key={key}")
    logger.debug("storage honours create-if-absent: driver=%s", driver.name)


async def _race(driver: Driver, key: str, payloads: list[bytes]) -> str | None:
    """Run the race; return what was wrong with its outcome, or None if it was right."""
    outcomes: list[Exception | None] = [None] * len(payloads)

    async def racer(i: int) -> None:
        try:
            await driver.put(key, payloads[i], if_absent=True)
        except Exception as exc:  # judged below, after both racers have finished
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(len(payloads)):
            tg.start_soon(racer, i)
    for outcome in outcomes:
        if outcome is not None and not isinstance(outcome, ObjectExistsError):
            raise outcome  # not an answer about the condition: the backend failed
    winners = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if len(winners) != 1:
        return (f"{len(winners)} of {len(payloads)} racing if_absent puts of one new key "
                f"succeeded, expected exactly 1")
    stored = await driver.get(key)
    if stored != payloads[winners[0]]:
        return "the stored object is not the bytes of the put that succeeded"
    return None


async def _delete_quietly(driver: Driver, key: str) -> None:
    try:
        await driver.delete([key])
    except Exception as exc:  # cleanup only: the original failure is what the caller sees
        logger.debug("could not delete the create-if-absent scratch key: key=%s error=%s",
                     key, exc)
