"""The lock of a `nar-diffusers sample` output folder: one run at a time writes into it.

`<output-dir>/.sample.lock` is created with `O_CREAT | O_EXCL` (creation either succeeds or finds the file: two
runs cannot both take it) and holds who took it: pid, host and start time, as JSON. A multi-process run shares the
lock of its main process. A lock left by a process of this host that no longer exists (a `kill -9`, a crash) is
stale and taken over; one from another host is never taken over, since its process cannot be checked from here.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

LOCK_NAME = ".sample.lock"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as file:
            owner = json.load(file)
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


class RunLock:
    """The lock of `folder` (its `.sample.lock`). `acquire` creates the folder when needed; `release` removes the
    lock, and the folder too when this lock created it and it is still empty (a refused run leaves nothing)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}  # fmt: skip
        self._created_folder = False
        self._held = False

    def acquire(self) -> None:
        """Take the lock or raise a ValueError naming the run that holds it."""
        if not os.path.isdir(self.folder):
            os.makedirs(self.folder)
            self._created_folder = True
        for _ in range(3):  # a stale lock is taken over, then the creation is tried again
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._take_over_stale():
                    raise ValueError(self._held_message()) from None
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(self.owner, file)
                file.flush()
                os.fsync(file.fileno())
            self._held = True
            return
        raise ValueError(self._held_message())

    def _take_over_stale(self) -> bool:
        """Remove the lock when its process is gone (this host only); whether it was removed."""
        owner = _read(self.path)
        if owner is None or owner.get("host") != self.owner["host"] or not isinstance(owner.get("pid"), int):
            return False  # being written right now, another host's, or not ours to judge
        if _process_exists(owner["pid"]):
            return False
        # Move it aside first and check it is still the stale one: another run may have taken it over meanwhile.
        aside = f"{self.path}.stale-{self.owner['token']}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True  # someone else removed it: try to create ours
        if _read(aside) == owner:
            os.remove(aside)
            return True
        try:
            os.link(aside, self.path)  # a live lock was moved: put it back
        except FileExistsError:
            pass
        os.remove(aside)
        return False

    def _held_message(self) -> str:
        owner = _read(self.path) or {}
        who = (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
               if owner else "a run that is starting")  # fmt: skip
        return (
            f"--output-dir {self.folder!r} is in use by another `nar-diffusers sample` run ({who}): wait for it to "
            f"end, or, if it is not running any more, remove {self.path}."
        )

    def release(self) -> None:
        """Remove the lock if it is still this run's; remove the folder if this lock made it and it is empty."""
        if self._held and (_read(self.path) or {}).get("token") == self.owner["token"]:
            os.remove(self.path)
        self._held = False
        if self._created_folder:
            try:
                os.rmdir(self.folder)  # only succeeds when empty
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
