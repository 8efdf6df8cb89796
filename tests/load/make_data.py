"""Writes ghz's data files from the STS-B test sentences in ../shared (nothing is copied into
the repository): ``.bench/ghz/sentences-1.json`` (one text per EmbedRequest) and
``sentences-32.json`` (32 per request). ghz sends the array's messages in turn.

    .venv/bin/python tests/load/make_data.py
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STSB_TEST = REPO.parent / "shared" / "data" / "stsbenchmark" / "sts-test.csv"
OUT_DIR = REPO / ".bench" / "ghz"


def read_sentences(path: Path) -> list[str]:
    """sentence1 and sentence2 of each pair, in file order."""
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [text.strip() for row in rows for text in row[5:7] if text.strip()]


def requests(sentences: list[str], per_request: int) -> list[dict[str, list[str]]]:
    count = len(sentences) // per_request * per_request
    return [{"texts": sentences[i : i + per_request]} for i in range(0, count, per_request)]


def main() -> int:
    sentences = read_sentences(STSB_TEST)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    ignore = OUT_DIR.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    for per_request in (1, 32):
        path = OUT_DIR / f"sentences-{per_request}.json"
        data = requests(sentences, per_request)
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        print(f"{path.relative_to(REPO)}: {len(data)} requests of {per_request} text(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
