"""A store's address checked before any work, and a fresh SQLite store set up once.

MLflow finds a bad `tracking.uri` late and slowly: a refused server after minutes of
retries, once the data is loaded; a plain path as a traceback about its file store.
`check` reads the address first and, where it names a host, connects to it with a
short timeout, so a run says in one line what is wrong before it does anything.

A fresh `mlflow.db` is created by MLflow's migrations, which two processes starting
together run at once and fail on ("table ... already exists"). `first_use` lets one
process at a time open a SQLite store for the first time in that process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from fashion_sweep.config import ConfigError
from fashion_sweep.redaction import redact

CONNECT_SECONDS = 5.0
PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
FORMS = (
    "sqlite:///<file>.db, a database URL (postgresql://user@host/db) "
    "or a tracking server's http(s)://host:port"
)


class StoreError(ConfigError):
    """A store that cannot be used; the message names the key and the address."""


def sqlite_path(uri: str) -> Path | None:
    """The file a sqlite:/// URI names (relative to the current folder), else None."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url  # note: only for SQLite addresses

    database = make_url(uri).database
    return Path(database) if database and database != ":memory:" else None


def check(key: str, uri: str, must_exist: bool = False) -> None:
    """Refuses an address that is not a store's, a SQLite file in a folder that cannot
    hold it (or, with must_exist, that is not there), a host that does not answer."""
    shown = f"{key}={redact(uri)}"
    parts = urlsplit(uri)
    if len(parts.scheme) < 2:  # a plain path (or a Windows drive letter)
        raise StoreError(f"{shown} is not a store address: give {FORMS}")
    if parts.scheme == "sqlite":
        path = sqlite_path(uri)
        if path is None:
            return
        if must_exist and not path.is_file():
            raise StoreError(f"{shown}: there is no MLflow store at {path.resolve()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"{shown}: cannot make its folder ({error.strerror})") from None
        if not os.access(path.parent, os.W_OK):
            raise StoreError(f"{shown}: its folder {path.parent.resolve()} is not writable")
        return
    if not parts.hostname:
        return  # databricks, a socket path, ...: the library's own checks
    scheme = parts.scheme.split("+")[0]
    try:
        port = parts.port or PORTS.get(scheme)
    except ValueError:
        raise StoreError(f"{shown}: the port is not a number") from None
    if port is None:
        return
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        why = error.strerror or type(error).__name__  # e.g. "Connection refused", "timed out"
        raise StoreError(
            f"{shown} cannot be reached ({why}): start it (`make server` for a tracking "
            f"server) or point {key} at one that runs"
        ) from None


@contextlib.contextmanager
def first_use(uri: str) -> Iterator[None]:
    """Holds the lock of the folder of a SQLite store while the block runs, so only one
    process at a time creates or migrates its tables; other stores pass through."""
    path = sqlite_path(uri)
    if path is None:
        yield
        return
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        yield  # check() reports what is wrong with the folder
        return
    try:
        with contextlib.suppress(OSError):  # a file system without locks: as before
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
