"""The report at scale and in a real browser: 5,000 studies well under a minute, and the
HTML rendered offline by headless chromium (skipped with a reason when it is absent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from matplotlib import image as mpimg

from medfusion.report.builder import validation_report
from medfusion.report.synthetic import write_batch


def test_five_thousand_studies_build_well_under_a_minute(tmp_path: Path) -> None:
    batch = write_batch(tmp_path, 5000, seed=10)
    start = time.perf_counter()
    r = validation_report(batch["out"] / "scores.csv", batch["labels"], tmp_path / "R",
                          subgroups=["site"], n_bootstrap=1000)
    elapsed = time.perf_counter() - start
    print(f"5000-study report with 1000 bootstrap replicates and 3 subgroups: {elapsed:.1f} s")
    assert r["n"] == 5000 and r["auroc"]["n_bootstrap_valid"] == 1000
    assert elapsed < 60


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_html_renders_in_a_headless_browser(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (Debian package `chromium`); CI installs it")
    batch = write_batch(tmp_path / "batch", 240, explain=True)
    validation_report(batch["scores"], batch["labels"], tmp_path / "R", subgroups=["site"],
                      n_bootstrap=100)
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--window-size=1200,2400", f"--screenshot={shot}",
           (tmp_path / "R" / "report.html").resolve().as_uri()]
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run(cmd, capture_output=True, timeout=120, check=False, env=env)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1000
    # Not blank: text and plots give many distinct colours and dark pixels.
    assert pixels.std() > 0.05
    assert (pixels.mean(axis=2) < 0.3).mean() > 0.002
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 50
