"""Atomic writes: the target holds the old content or the whole new one, never a part."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from medfusion.atomic import _umask, atomic_open, atomic_path, write_bytes, write_text


def test_write_replaces_whole_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "scores.csv"
    write_text(target, "old\n")
    write_text(target, "new\n")
    write_bytes(tmp_path / "w.bin", b"\x00\x01")
    assert target.read_text() == "new\n"
    assert (tmp_path / "w.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv", "w.bin"]


def test_failure_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    write_text(target, '{"ok": true}')
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write('{"half": ')
        raise RuntimeError("killed")
    assert target.read_text() == '{"ok": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_temporary_path_keeps_the_suffixes(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "ct.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "ct.nii.gz").read_bytes() == b"x"


def test_atomic_output_mode_follows_the_umask(tmp_path: Path) -> None:
    """0666 less the umask, as any file the user creates (mkstemp alone gives 0600); the
    umask is read without being changed."""
    before = os.umask(0o027)
    try:
        assert _umask() == 0o027
        assert os.umask(0o027) == 0o027  # still the user's mask after reading it
        write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    finally:
        os.umask(before)
