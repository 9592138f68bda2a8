"""The one folder walker: link loops, links leaving the root, dangling links and repeated
views of a folder are each reported once, in a reproducible order, and never followed."""

from __future__ import annotations

import os
from pathlib import Path

from medfusion.io.dicom import iter_files
from medfusion.io.study import discover_study_files
from medfusion.io.walk import LINK_OUTSIDE, NOT_REGULAR, OK, SYMLINK_LOOP, walk_files
from medfusion.scoring.discovery import input_digest, walk_safe


def _tree(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("a")
    (root / "b" / "c.dcm").write_text("c")
    (root / "b" / "deep" / "d.dcm").write_text("d")
    (root / ".hidden" / "h.dcm").write_text("h")
    outside = tmp_path / "outside.dcm"
    outside.write_text("o")
    os.symlink(outside, root / "out_link.dcm")
    os.symlink(root / "loop", root / "loop")  # a link to itself
    os.symlink(root / "missing", root / "dangling.dcm")
    os.symlink(root / "b", root / "view_of_b")  # a second view of b: visited once
    return root


def test_statuses_and_order(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    got = [(str(p.relative_to(root)), s) for p, s in walk_files(root)]
    assert got == [
        ("a.txt", OK),
        ("dangling.dcm", NOT_REGULAR),
        ("loop", SYMLINK_LOOP),
        ("out_link.dcm", LINK_OUTSIDE),
        (".hidden/h.dcm", OK),
        ("b/c.dcm", OK),
        ("b/deep/d.dcm", OK),
    ]
    hidden_skipped = [str(p.relative_to(root)) for p, _ in
                      walk_files(root, skip_hidden_dirs=True)]
    assert ".hidden/h.dcm" not in hidden_skipped


def test_every_caller_walks_alike(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    dicom, _, skipped = discover_study_files(root)
    assert {p.name for p in dicom} == {"c.dcm", "d.dcm", "h.dcm"}
    assert {(p.name, why) for p, why in skipped} >= {
        ("loop", "SYMLINK_LOOP"), ("out_link.dcm", "LINK_OUTSIDE"),
        ("dangling.dcm", "NOT_REGULAR"), ("a.txt", "NOT_IMAGE")}
    assert {p.name for p in iter_files(root)} == {"a.txt", "c.dcm", "d.dcm", "h.dcm"}
    batch = {(Path(p).name, s) for p, s in walk_safe(str(root), str(root))}
    assert batch == {("a.txt", "ok"), ("c.dcm", "ok"), ("d.dcm", "ok"),
                     ("out_link.dcm", "outside"), ("loop", "broken"),
                     ("dangling.dcm", "broken")}


def test_input_digest_follows_names_and_contents_not_order(tmp_path: Path) -> None:
    study = tmp_path / "study"
    study.mkdir()
    (study / "a.dcm").write_bytes(b"\x00" * 3_000_000 + b"A")  # more than one hashed chunk
    (study / "b.dcm").write_bytes(b"B")
    files = [str(study / "a.dcm"), str(study / "b.dcm")]
    first = input_digest(files, str(study))
    assert first.startswith("xxh3-128:") and len(first) == len("xxh3-128:") + 32
    assert input_digest(files[::-1], str(study)) == first  # listing order does not matter
    (study / "a.dcm").write_bytes(b"\x00" * 3_000_000 + b"a")  # one byte edited at the end
    edited = input_digest(files, str(study))
    assert edited != first
    (study / "a.dcm").rename(study / "c.dcm")  # same bytes, another name
    renamed = input_digest([str(study / "c.dcm"), str(study / "b.dcm")], str(study))
    assert renamed not in (first, edited)
    (study / "d.dcm").write_bytes(b"")  # one more (empty) file
    grown = input_digest([str(study / p) for p in ("c.dcm", "b.dcm", "d.dcm")], str(study))
    assert grown not in (first, edited, renamed)
