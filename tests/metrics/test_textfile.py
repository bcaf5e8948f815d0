"""The textfile write (hvcpolicy.exporter.write_atomic): whole or not at all, nothing left over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hvcpolicy.errors import InvalidInput, Unavailable
from hvcpolicy.exporter import write_atomic


def test_replaces_the_file_whole_and_leaves_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "hvcpolicy.prom"
    write_atomic(str(path), "a 1\n")
    write_atomic(str(path), "b 2\n")
    assert path.read_text() == "b 2\n"
    assert os.listdir(tmp_path) == ["hvcpolicy.prom"]
    assert path.stat().st_mode & 0o777 == 0o644  # node_exporter runs as its own user


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "hvcpolicy.prom"
    write_atomic(str(path), "a 1\n")
    with pytest.raises(UnicodeEncodeError):
        write_atomic(str(path), "bad \udcff\n")
    assert path.read_text() == "a 1\n"
    assert os.listdir(tmp_path) == ["hvcpolicy.prom"]


def test_a_missing_directory_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="cannot write"):
        write_atomic(str(tmp_path / "nowhere" / "hvcpolicy.prom"), "a 1\n")


def test_only_prom_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"\*\.prom"):
        write_atomic(str(tmp_path / "hvcpolicy.txt"), "a 1\n")
