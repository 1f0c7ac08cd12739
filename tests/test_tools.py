"""Thin CLIs in tools/ run and write complete files."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_export_stdlib_corpus(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "export_stdlib_corpus.py"),
            "--out",
            str(tmp_path),
            "--samples-per-task",
            "5",
            "--max-chars",
            "600",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["code_completion.jsonl", "code_to_docstring.jsonl", "text_to_code.jsonl"]
    for path in tmp_path.iterdir():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(rows) == 5
        assert all([r["role"] for r in row["chat_rounds"]] == ["human", "bot"] for row in rows)
