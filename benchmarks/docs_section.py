"""Regenerate one marked section of a docs page, leaving the rest of the page as written."""

from __future__ import annotations

import os
import platform
import re
from datetime import date
from pathlib import Path

BENCHMARKS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def machine_stamp(command: str) -> str:
    return f"Measured {date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores), `{command}`."


def replace_section(key: str, heading: str, body: str, page: Path = BENCHMARKS_PAGE) -> None:
    """Put ``body`` between the ``<!-- key:start -->`` and ``<!-- key:end -->`` markers (appended under ``heading`` the first time)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    section = f"{start}\n{body}\n{end}"
    text = page.read_text(encoding="utf-8")
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + f"\n\n## {heading}\n\n" + section + "\n"
    page.write_text(text, encoding="utf-8")
