"""Count medfusion's imports by kind and list those that break the layer table.

    python pipelines/layer_imports.py [--list]

Prints the number of medfusion imports, of function-local ones outside the entry points and
package ``__init__`` files, and of imports that go up (or across) the layers of
docs/architecture.md; ``--list`` prints each violation too.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medfusion.testing.layers import counts, package_imports, violations

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    imports = package_imports(ROOT)
    for key, value in counts(imports).items():
        print(f"{key}: {value}")
    problems = violations(imports)
    print(f"violations: {len(problems)}")
    if "--list" in argv:
        for line in problems:
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
