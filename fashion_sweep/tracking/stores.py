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
import logging
import os
import socket
import sqlite3
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from fashion_sweep.config import ConfigError
from fashion_sweep.tracking.redaction import redact

log = logging.getLogger(__name__)
CONNECT_SECONDS = 5.0
FIRST_USE_SECONDS = 120.0  # a fresh store's migrations take seconds; a holder this long is stuck
SQLITE_HEADER = b"SQLite format 3\x00"
DATABRICKS = ("databricks", "databricks-uc", "uc")
PORTS = {"http": 80, "https": 443, "postgresql": 5432, "mysql": 3306, "mssql": 1433}
_ABSOLUTE: dict[str, str] = {}  # see absolute
# What marks a database as one tool's: MLflow's tables, an Optuna study's. Both keep their
# schema's version in `alembic_version`, so neither can share a database with the other.
TOOLS = {
    "mlflow": ("MLflow's store", {"experiments", "runs"}, "sqlite:///mlflow.db"),
    "optuna": ("an Optuna study's database", {"studies", "trials"}, "sqlite:///optuna.db"),
}
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
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(uri).database
    except ArgumentError as error:
        raise ValueError(str(error)) from None
    return Path(database) if database and database != ":memory:" else None


def absolute(uri: str) -> str:
    """`uri` as MLflow is given it: a SQLite file by its absolute path, resolved from
    the folder this process first used `uri` in. MLflow keeps one store per URI string
    for the whole process, so a relative `sqlite:///mlflow.db` named that first folder's
    file before, for a sweep's jobs too (with hydra.job.chdir=true); now the rule is
    ours, and `forget` can start it afresh (tests running commands in one process)."""
    if uri not in _ABSOLUTE:
        path = sqlite_path(uri)
        _ABSOLUTE[uri] = f"sqlite:///{path.resolve()}" if path is not None else uri
    return _ABSOLUTE[uri]


def forget() -> None:
    _ABSOLUTE.clear()


def check(key: str, uri: str, must_exist: bool = False, tool: str = "mlflow") -> None:
    """Refuses, in one line and within seconds and before anything is written, an
    address that is not a store's, a SQLite file that is not a database or cannot be
    read (or, with must_exist, holds no MLflow store), a folder that cannot hold one, a
    server or database that does not answer or let us in, and the other tool's database
    (`tool`: mlflow, or optuna for a study's storage)."""
    shown = f"{key}={redact(uri)}"
    try:
        parts = urlsplit(uri)
        port = parts.port or PORTS.get(parts.scheme.split("+")[0])
        if parts.scheme == "sqlite":
            return _check_sqlite(shown, sqlite_path(uri), must_exist, tool)
    except StoreError:
        raise
    except ValueError as error:  # not a URL: a bad port, a bracket, SQLAlchemy's parse
        raise StoreError(f"{shown} cannot be read as an address ({error}): give {FORMS}") from None
    if uri in DATABRICKS or parts.scheme.startswith("databricks"):
        return  # the library's own checks
    if len(parts.scheme) < 2:  # a plain path (or a Windows drive letter)
        raise StoreError(f"{shown} is not a store address: give {FORMS}")
    if not parts.hostname or port is None:
        return  # a socket path, a scheme of a plugin: the library's own checks
    what = f"start it (`make server` for a tracking server) or point {key} at one that runs"
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        why = error.strerror or type(error).__name__  # e.g. "Connection refused", "timed out"
        raise StoreError(f"{shown} cannot be reached ({why}): {what}") from None
    if parts.scheme in ("http", "https"):
        _check_server(shown, f"{parts.scheme}://{parts.hostname}:{port}{parts.path}", what)
    else:
        _check_login(shown, uri, tool)


def _check_sqlite(shown: str, path: Path | None, must_exist: bool, tool: str) -> None:
    if path is None:
        return  # in memory
    if must_exist and not path.is_file():  # read only: the file must hold MLflow's tables
        raise StoreError(f"{shown}: there is no MLflow store at {path.resolve()}")
    if not must_exist:
        _check_folder(shown, path)
    if path.exists() and not path.is_file():
        raise StoreError(f"{shown}: {path.resolve()} is not a file")
    if not path.is_file() or not path.stat().st_size:
        if must_exist:
            raise StoreError(f"{shown}: {path.resolve()} holds no MLflow store")
        return  # a new database, made on first use
    try:
        with path.open("rb") as file:
            if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise StoreError(f"{shown}: {path.resolve()} is not a SQLite database")
        with contextlib.closing(
            sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        ) as db:
            tables = {
                row[0] for row in db.execute("select name from sqlite_master where type = 'table'")
            }
    except (OSError, sqlite3.Error) as error:
        why = getattr(error, "strerror", None) or error
        raise StoreError(f"{shown}: {path.resolve()} cannot be read ({why})") from None
    _check_tables(shown, str(path.resolve()), tables, tool)
    if must_exist and not TOOLS["mlflow"][1] <= tables:
        raise StoreError(f"{shown}: {path.resolve()} holds no MLflow store")


def _check_folder(shown: str, path: Path) -> None:
    """The folder of a new or existing SQLite file can hold it: made if missing, and a
    file can be created there (os.access says yes to root where nothing can be: /proc)."""
    if path.parent.exists() and not path.parent.is_dir():
        raise StoreError(f"{shown}: {path.parent.resolve()} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
    except OSError as error:
        why = error.strerror or type(error).__name__
        raise StoreError(
            f"{shown}: its folder {path.parent.resolve()} cannot hold it ({why})"
        ) from None


def _check_tables(shown: str, where: str, tables: set[str], tool: str) -> None:
    """Refuses the other tool's database: each keeps its schema's version in the same
    table, and would fail on the other's ("Can't locate revision ...")."""
    for other, (what, marks, _) in TOOLS.items():
        if other != tool and marks & tables:
            mine, _, own = TOOLS[tool]
            whose = "MLflow" if tool == "mlflow" else "the study"
            raise StoreError(
                f"{shown}: {where} is {what}, not {mine}: give {whose} a database of its "
                f"own (e.g. {own})"
            )


def _check_server(shown: str, url: str, what: str) -> None:
    """A tracking server answers (any HTTP status will do: it is there)."""
    try:
        urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=CONNECT_SECONDS).close()
    except urllib.error.HTTPError:
        pass
    except (OSError, ValueError) as error:
        why = getattr(error, "reason", None) or error
        raise StoreError(f"{shown} does not answer ({why}): {what}") from None


def _check_login(shown: str, uri: str, tool: str) -> None:
    """A database lets us in, once (MLflow would retry a refused login for minutes), and
    is not the other tool's."""
    from sqlalchemy import create_engine, inspect

    timeout = {"connect_timeout": int(CONNECT_SECONDS)} if uri.startswith("postgresql") else {}
    try:
        engine = create_engine(uri, connect_args=timeout)
        try:
            with engine.connect() as connection:
                tables = set(inspect(connection).get_table_names())
        finally:
            engine.dispose()
    except Exception as error:  # a refused login, a missing driver, no such database
        reason = " ".join(str(getattr(error, "orig", None) or error).split())[:300]
        raise StoreError(f"{shown}: cannot connect ({type(error).__name__}: {reason})") from None
    _check_tables(shown, "that database", tables, tool)


@contextlib.contextmanager
def first_use(uri: str) -> Iterator[None]:
    """Holds the lock of the folder of a SQLite store while the block runs, so only one
    process at a time creates or migrates its tables; other stores pass through. Waits
    at most FIRST_USE_SECONDS, saying so after a few."""
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
        _lock(fd, path)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, path: Path) -> None:
    start = time.monotonic()
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError:
            return  # a file system without locks: as before
        waited = time.monotonic() - start
        if waited > FIRST_USE_SECONDS:
            raise StoreError(
                f"another process has been setting up the MLflow store {path.resolve()} "
                f"for {FIRST_USE_SECONDS:.0f} s: is it stopped? (see `fuser {path.parent}`)"
            )
        if waited > 5 and not said:
            log.warning(f"Waiting for another process setting up the MLflow store {path}")
            said = True
        time.sleep(0.05)
