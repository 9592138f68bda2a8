"""How long `medfusion report` takes, and whether its two AUROC intervals agree.

Writes a synthetic scored batch (the exact scores.csv layout of `medfusion score`) of N
studies, builds the full report (bootstrap, DeLong, subgroups, comparison, plots, HTML) and
prints the wall time of each size, plus the bootstrap and DeLong 95% intervals side by side.

    .venv/bin/python pipelines/bench_report.py                 # 1000 and 5000 studies
    .venv/bin/python pipelines/bench_report.py --sizes 20000 --n-bootstrap 2000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from medfusion.report.builder import validation_report
from medfusion.report.synthetic import write_batch


def bench(n: int, n_bootstrap: int, root: Path) -> dict[str, object]:
    batch = write_batch(root / f"n{n}", n, seed=n)
    baseline = write_batch(root / f"n{n}-baseline", n, seed=n, strength=0.8)
    start = time.perf_counter()
    report = validation_report(
        batch["scores"], batch["labels"], root / f"n{n}-report", subgroups=["site", "sex"],
        compare=baseline["scores"], n_bootstrap=n_bootstrap,
    )
    seconds = time.perf_counter() - start
    auroc = report["auroc"]
    html_bytes = (root / f"n{n}-report" / "report.html").stat().st_size
    return {
        "studies": n,
        "n_bootstrap": n_bootstrap,
        "seconds": round(seconds, 2),
        "auroc": round(auroc["value"], 4),
        "bootstrap_ci": [round(auroc["ci_low"], 4), round(auroc["ci_high"], 4)],
        "delong_ci": [round(auroc["delong"]["ci_low"], 4), round(auroc["delong"]["ci_high"], 4)],
        "compare_p": report["comparison"]["p_value"],
        "html_kib": round(html_bytes / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            print(json.dumps(bench(n, args.n_bootstrap, Path(tmp))))


if __name__ == "__main__":
    main()
