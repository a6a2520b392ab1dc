"""The repository cites only itself: no file refers to the maintainers' working notes outside it
(a clone does not have them), and every ``docs/*.md`` a file names exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"PAPER\.md|\.\./shared")
DOC_LINK = re.compile(r"docs/([A-Za-z0-9_\-]+\.md)")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    files = []
    for name in out.stdout.splitlines():
        path = REPO / name
        if name.startswith("tests/") or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        if path.suffix in {".png", ".jpg", ".ipynb"} and path.suffix != ".ipynb":
            continue
        files.append(path)
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def test_nothing_points_outside_the_repository():
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()[:80]}"
            for p in _tracked_text_files()
            for n, line in enumerate(_read(p).splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "references to files outside the repository:\n" + "\n".join(hits)


def test_every_cited_doc_exists():
    missing = sorted({f"{p.relative_to(REPO)} -> docs/{m}"
                      for p in _tracked_text_files()
                      for m in DOC_LINK.findall(_read(p)) if not (REPO / "docs" / m).is_file()})
    assert not missing, "cited docs that do not exist:\n" + "\n".join(missing)
