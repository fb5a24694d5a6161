"""An exclusive lease on a file path: one holder at a time, and a fencing token that every commit checks.

Why a lease file and not fcntl/flock: job directories live on shared storage (EFS, a ReadWriteMany volume — see
deploy/), where POSIX locks are unreliable on some NFS setups and vanish with a client's lock daemon. A lease file is
published with link(2), which is atomic on NFS too (it fails when the name exists), and names its holder (host, pid,
since when) and a fresh random fencing token. A heartbeat thread renews it every TTL/6 seconds. It is stale when its
heartbeat is older than the TTL (so hosts' clocks must agree within seconds: NTP), or at once when its holder is a
dead process on this host; a stale lease is moved aside by rename (atomic: one taker wins) and replaced.

Fencing: before a commit (a checkpoint rename, a record write, a publish) the holder calls `check()`, which re-reads
the lease file and fails when it no longer names the holder's token — a driver that stalled past its TTL and was
replaced can never commit. The check and the commit are two steps; a holder would have to stall longer than the TTL
exactly between them, which the TTL (30 s by default) makes far less likely than any other failure.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rankmerge.workers.atomic_io import write_atomic, write_temp
from rankmerge.workers.errors import MergeInputError

log = logging.getLogger(__name__)
DEFAULT_TTL = float(os.environ.get("RANKMERGE_LEASE_TTL", "30"))  # seconds without a heartbeat before a lease is stale
POLL = 0.2


class LeaseHeld(MergeInputError):
    """Someone else holds the lease (a live holder, or one whose TTL has not run out yet)."""


class LeaseLost(MergeInputError):
    """This holder's lease expired and was taken over: it must not commit anything any more."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux /proc), so a reused pid is not taken for the holder; None elsewhere."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return started is None or _process_start(pid) in (None, started)


@dataclass
class Holder:
    """What a lease file says about its holder."""

    token: str
    host: str
    pid: int
    started: str | None
    since: float
    heartbeat: float
    ttl: float

    @classmethod
    def me(cls, ttl: float) -> Holder:
        now = time.time()
        pid = os.getpid()
        return cls(secrets.token_hex(8), socket.gethostname(), pid, _process_start(pid), now, now, ttl)

    @classmethod
    def parse(cls, raw: bytes) -> Holder | None:
        try:
            return cls(**json.loads(raw))
        except (ValueError, TypeError):
            return None

    def dump(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def stale(self) -> bool:
        if time.time() - self.heartbeat > self.ttl:
            return True
        return self.host == socket.gethostname() and not _alive(self.pid, self.started)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host} since {since} (heartbeat {max(time.time() - self.heartbeat, 0):.0f} s ago)"


def read_raw(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def current_holder(path: Path) -> Holder | None:
    """The holder a lease file names, or None when there is no (readable) lease."""
    raw = read_raw(path)
    return None if raw is None else Holder.parse(raw)


class Lease:
    """`with Lease(path).acquire():` — held (and renewed) until the block ends; `check()` before every commit."""

    def __init__(self, path: Path, what: str = "lease", ttl: float = DEFAULT_TTL) -> None:
        self.path, self.what, self.ttl = Path(path), what, ttl
        self.me = Holder.me(ttl)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    @property
    def token(self) -> str:
        return self.me.token

    # ---- taking it ---------------------------------------------------------------------------------------------------
    def acquire(self, wait: float = 0.0) -> Lease:
        """Take the lease, waiting up to `wait` seconds for a live holder to go; LeaseHeld after that."""
        deadline = time.monotonic() + wait
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            raw = read_raw(self.path)
            holder = None if raw is None else Holder.parse(raw)
            if raw is not None and (holder is None or holder.stale()):
                self._bury(raw, holder)
                continue
            if raw is not None and time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.path.parent} is held by another {self.what}: {holder.describe()}",
                                f"wait for it to end, or stop it (kill {holder.pid} on {holder.host}); a dead holder's "
                                f"lease expires {holder.ttl:.0f} s after its last heartbeat")
            time.sleep(POLL)
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()
        log.info("took %s %s (token %s)", self.what, self.path, self.token)
        return self

    def _create(self) -> bool:
        """Publish our lease file if the name is free: link(2) fails when it exists (atomic on NFS as well)."""
        tmp = write_temp(self.path, self.me.dump())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _bury(self, raw: bytes, holder: Holder | None) -> None:
        """Move a stale lease aside; when a racing taker replaced it first, put theirs back (we moved a live lease)."""
        grave = self.path.parent / f".{self.path.name}.stale-{secrets.token_hex(4)}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        if grave.read_bytes() != raw:
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
        else:
            log.warning("taking over the stale %s %s of %s", self.what, self.path, holder.describe() if holder else "(unreadable)")
        grave.unlink(missing_ok=True)

    # ---- holding it --------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Fencing: fail unless the lease file still names this holder's token (call right before a commit)."""
        holder = current_holder(self.path)
        if self.lost or holder is None or holder.token != self.token:
            self.lost = True
            who = f"now held by {holder.describe()}" if holder else "released by someone else"
            raise LeaseLost(f"this {self.what} on {self.path.parent} lost its lease ({who}); nothing more is committed",
                            "another process runs this job now: follow that one, or stop it and resume")

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            try:
                self.check()
                self.me.heartbeat = time.time()
                write_atomic(self.path, self.me.dump())
            except LeaseLost as exc:
                log.error("%s", exc)
                return
            except OSError as exc:  # storage hiccup: try again at the next beat, the TTL leaves room for a few
                log.warning("could not renew %s: %s", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = current_holder(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Lease:
        return self if self._thread is not None else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def wait_until_free(path: Path, timeout: float) -> Holder | None:
    """Wait until nobody live holds the lease at `path` (a dead holder's lease expires); the live holder, or None."""
    deadline = time.monotonic() + timeout
    while (holder := current_holder(path)) is not None and not holder.stale():
        if time.monotonic() >= deadline:
            return holder
        time.sleep(POLL)
    return None


DRIVER_LEASE = "driver.lease"


def driver_lease(job_dir: Path) -> Lease:
    """The one-driver-per-job lease: `job_dir/driver.lease`, held from before any heavy work to the driver's end."""
    return Lease(job_dir / DRIVER_LEASE, "driver")
