"""The address file of a running `mailbeacon up`: written for this user only, credentials
left out, ignored once its process is gone or when someone else could have written it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailbeacon.app.devstate import UpState, read_state, remove_state, write_state
from mailbeacon.contract.settings import Settings


def settings(tmp_path: Path) -> Settings:
    return Settings(runtime_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"))


def state(pid: int, nats: str | None = "nats://127.0.0.1:4222") -> UpState:
    return UpState(pid, "127.0.0.1:2525", "http://127.0.0.1:8080", "http://127.0.0.1:8090", nats)


def test_written_read_and_removed_by_its_process(tmp_path: Path) -> None:
    s = settings(tmp_path)
    path = write_state(s, state(os.getpid()))
    assert path == tmp_path / "run" / "mailbeacon" / "up.json"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert read_state(s) == state(os.getpid())
    remove_state(s, os.getpid() + 1)  # a later `up` replaced it: not ours to remove
    assert path.exists()
    remove_state(s, os.getpid())
    assert not path.exists() and read_state(s) is None


def test_a_nats_url_with_credentials_is_not_written(tmp_path: Path) -> None:
    s = settings(tmp_path)
    path = write_state(s, state(os.getpid(), "nats://user:secret@127.0.0.1:4222"))
    assert "secret" not in path.read_text()
    found = read_state(s)
    assert found is not None and found.nats is None and found.aggregator == "http://127.0.0.1:8090"


def test_the_file_of_an_up_that_died_is_ignored(tmp_path: Path) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    s = settings(tmp_path)
    write_state(s, state(int(gone.stdout)))
    assert read_state(s) is None


def test_a_directory_others_may_write_to_is_not_trusted(tmp_path: Path) -> None:
    s = settings(tmp_path)
    write_state(s, state(os.getpid()))
    (tmp_path / "run" / "mailbeacon").chmod(0o777)
    assert read_state(s) is None
    with pytest.raises(PermissionError):
        write_state(s, state(os.getpid()))


def test_the_default_directory_is_per_user(tmp_path: Path) -> None:
    assert Settings(runtime_dir=None).up_state_dir() == Path(f"/tmp/mailbeacon-{os.getuid()}")
    assert settings(tmp_path).up_state_dir() == tmp_path / "run" / "mailbeacon"
