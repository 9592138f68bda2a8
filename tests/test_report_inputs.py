"""Reading scores.csv / labels.csv defensively: mutated tables give a coded refusal or a
usable table, never another exception type."""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path

import numpy as np

from medfusion.errors import MedfusionError
from medfusion.report import inputs as I
from medfusion.report.synthetic import write_batch

JUNK = ["", "nan", "inf", "-1", "2", "abc", "1e309", "0.5", "normal|lesion", "x|y", "true",
        "maybe", '"', "\x00", "é", "lesion", "normal", "0", "1", "  "]


def _mutate(rows: list[list[str]], rnd: random.Random) -> list[list[str]]:
    rows = [list(r) for r in rows]
    for _ in range(rnd.randint(1, 6)):
        r = rnd.randrange(len(rows))
        if not rows[r]:
            continue
        c = rnd.randrange(len(rows[r]))
        op = rnd.random()
        if op < 0.7:
            rows[r][c] = rnd.choice(JUNK)
        elif op < 0.85:
            del rows[r][c]
        else:
            rows.insert(rnd.randrange(1, len(rows)), list(rows[rnd.randrange(1, len(rows))]))
    return rows


def test_mutated_tables_never_raise_an_uncoded_exception(tmp_path: Path) -> None:
    batch = write_batch(tmp_path / "b", 25, seed=2)
    scores = list(csv.reader(io.StringIO(batch["scores"].read_text())))
    labels = list(csv.reader(io.StringIO(batch["labels"].read_text())))
    rnd = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(300):
        s_path, l_path = tmp_path / f"s{i}.csv", tmp_path / f"l{i}.csv"
        with open(s_path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(_mutate(scores, rnd))
        with open(l_path, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(_mutate(labels, rnd))
        try:
            sc = I.read_scores(s_path)
            lab = I.read_labels(l_path, sc.labels, ["site"])
        except MedfusionError as error:
            assert error.code.startswith("REPORT_")
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        # what was accepted is usable: finite probabilities in [0, 1], known class indices
        assert np.all(np.isfinite(sc.probs)) and sc.probs.min() >= 0 and sc.probs.max() <= 1
        assert all(0 <= k < len(sc.labels) for k in lab.truth.values())
    assert outcomes["ok"] > 30 and outcomes["refused"] > 30  # both paths exercised


def test_label_values_map_by_name_index_or_boolean(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    for cells, expected in (
        (["Lesion", "normal"], [1, 0]),
        (["1", "0"], [1, 0]),
        (["true", "false"], [1, 0]),
    ):
        path.write_text("study_id,label\na," + cells[0] + "\nb," + cells[1] + "\n")
        lab = I.read_labels(path, ("normal", "lesion"), [])
        assert [lab.truth["a"], lab.truth["b"]] == expected
