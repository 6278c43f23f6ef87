"""A store's address is checked in one line before any work, and a fresh SQLite store
is set up by one process at a time."""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import threading
import time

import pytest

from fashion_sweep.tracking import stores
from fashion_sweep.tracking.stores import StoreError
from tests.conftest import free_port


def refused(uri: str) -> str:
    start = time.monotonic()
    with pytest.raises(StoreError) as caught:
        stores.check("tracking.uri", uri)
    assert time.monotonic() - start < stores.CONNECT_SECONDS + 1
    return str(caught.value)


def test_a_server_that_does_not_answer_is_named_at_once_with_its_password_masked():
    port = free_port()  # nothing listens there
    message = refused(f"http://me:secret@127.0.0.1:{port}")
    assert message.startswith(f"tracking.uri=http://me:***@127.0.0.1:{port} cannot be reached")
    assert "refused" in message and "secret" not in message and "\n" not in message
    db = refused(f"postgresql+psycopg://sweeper@127.0.0.1:{port}/mlflow")
    assert "cannot be reached" in db


@pytest.mark.parametrize("uri", ["garbage", "mlruns", "/tmp/mlflow.db", "C:/runs"])
def test_a_plain_path_is_not_a_store_address(uri):
    assert "is not a store address: give sqlite:///" in refused(uri)


def test_sqlite_folders_are_made_or_refused_and_a_read_only_open_needs_the_file(tmp_path):
    stores.check("tracking.uri", f"sqlite:///{tmp_path}/new/mlflow.db")
    assert (tmp_path / "new").is_dir()  # where the store will be
    (tmp_path / "file").write_text("")
    assert "file is a file, not a folder" in refused(f"sqlite:///{tmp_path}/file/mlflow.db")
    with pytest.raises(StoreError, match="there is no MLflow store at"):
        stores.check("tracking.uri", f"sqlite:///{tmp_path}/mlfow.db", must_exist=True)
    assert not (tmp_path / "mlfow.db").exists()
    stores.check("tracking.uri", "sqlite://")  # in memory: nothing to check


def test_a_server_that_takes_the_connection_but_never_answers_is_named(monkeypatch):
    monkeypatch.setattr(stores, "CONNECT_SECONDS", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        message = refused(f"http://127.0.0.1:{port}")
    assert message.startswith(f"tracking.uri=http://127.0.0.1:{port} does not answer (timed out)")


@pytest.mark.parametrize(
    "uri, why",
    [
        ("sqlite:mlflow.db", "Could not parse SQLAlchemy URL"),
        ("http://[::1", "Invalid IPv6 URL"),
        ("http://127.0.0.1:99999", "Port out of range"),
    ],
)
def test_an_address_that_cannot_be_read_is_one_line(uri, why):
    message = refused(uri)
    assert message.startswith(f"tracking.uri={uri} cannot be read as an address ({why}")


def test_a_file_that_is_not_a_store_is_refused_and_left_alone(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("not a database")
    assert refused(f"sqlite:///{text}").endswith(f"{text} is not a SQLite database")
    other = tmp_path / "optuna.db"
    sqlite3.connect(other).execute("create table studies (id)").connection.commit()
    with pytest.raises(StoreError, match=f"{other} is an Optuna study's database"):
        stores.check("tracking.uri", f"sqlite:///{other}", must_exist=True)
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")  # predict reads: it must not set up MLflow's schema there
    with pytest.raises(StoreError, match=f"{empty} holds no MLflow store"):
        stores.check("tracking.uri", f"sqlite:///{empty}", must_exist=True)
    assert empty.read_bytes() == b""
    with sqlite3.connect(other) as db:  # read only: nothing was added
        assert db.execute("select name from sqlite_master").fetchall() == [("studies",)]


def unusable(tmp_path):
    """SQLite stores that cannot be used, each with the words that refuse it."""
    (tmp_path / "folder.db").mkdir()
    (tmp_path / "text.db").write_text("not a database")
    sqlite3.connect(tmp_path / "whole.db").execute("create table t (x)").connection.commit()
    (tmp_path / "cut.db").write_bytes((tmp_path / "whole.db").read_bytes()[:100])
    mlflow, optuna = tmp_path / "mlflow.db", tmp_path / "optuna.db"
    sqlite3.connect(mlflow).execute("create table experiments (x)").connection.commit()
    sqlite3.connect(optuna).execute("create table studies (x)").connection.commit()
    return {
        "/proc/nope.db": "its folder /proc cannot hold it",  # os.access says yes to root
        tmp_path / "folder.db": "is not a file",
        tmp_path / "text.db": "is not a SQLite database",
        tmp_path / "cut.db": "cannot be read (database disk image is malformed)",
    }, {
        "mlflow": (optuna, "is an Optuna study's database, not MLflow's store: give MLflow"),
        "optuna": (mlflow, "is MLflow's store, not an Optuna study's database: give the study"),
    }


@pytest.mark.parametrize("tool", ["mlflow", "optuna"])
def test_every_unusable_sqlite_store_is_refused_at_once_and_left_alone(tmp_path, tool):
    """Unwritable, not a file, not a database, damaged, the other tool's: each in one
    line, before anything is written (MLflow waited 111 s on /proc/nope.db, retrying)."""
    broken, other = unusable(tmp_path)
    path, why = other[tool]
    broken[path] = why
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    for path, why in broken.items():
        with pytest.raises(StoreError) as caught:
            stores.check("key", f"sqlite:///{path}", tool=tool)
        assert why in str(caught.value) and "\n" not in str(caught.value)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_first_use_of_a_sqlite_store_is_one_opener_at_a_time(tmp_path):
    """flock locks belong to an open file: two openers in one process exclude each other
    as two processes do."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    order = []

    def second() -> None:
        with stores.first_use(uri):
            order.append("second")

    with stores.first_use(uri):
        waiting = threading.Thread(target=second)
        waiting.start()
        time.sleep(0.3)
        order.append("first done")
    waiting.join(5)
    assert order == ["first done", "second"]
    with stores.first_use("http://127.0.0.1:5000"):  # not a file: nothing to lock
        pass


def test_a_first_use_held_too_long_is_one_line_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(stores, "FIRST_USE_SECONDS", 0.3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder = os.open(tmp_path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a stopped process that holds it
    try:
        with (
            pytest.raises(StoreError, match="another process has been setting up"),
            stores.first_use(uri),
        ):
            pass
    finally:
        os.close(holder)
