"""What the benchmark scripts share: where their work lives and how a child run is started."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "benchmarks" / "work"
THREADS = 2  # this machine's cores; every run, ours and the peer's, uses the same


def run_child(args: list, log: Path, env: dict | None = None) -> None:
    """Run one configuration in its own process (its peak RSS is its own), output to ``log``;
    ``env`` adds environment variables."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false", **(env or {}))
    with open(log, "w") as f:
        proc = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed; see {log}")


def write_results_section(name: str, body: str) -> None:
    """Put ``body`` into docs/results.md between ``<!-- name:begin -->`` and ``<!-- name:end -->``,
    replacing that section if it exists, appending it otherwise; the rest of the file is kept."""
    path = ROOT / "docs" / "results.md"
    path.parent.mkdir(exist_ok=True)
    text = path.read_text() if path.exists() else "# Results\n\nEvery number here is produced by a script in `benchmarks/`.\n\n"
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text += "\n" + block
    path.write_text(text)
