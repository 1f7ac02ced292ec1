"""Comments and docs say why, not when, and cite only what a reader of the repository can open.

Issue numbers, "today's", and the project's private design notes mean nothing to someone who cloned the
repository: a reference must be a paper section, a file and line of a named public repository at a named commit,
or a file in this repository. This test reads every shipped text file and names each offending line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("gmae", "experiments", "tools", "tests", "docs", ".ci")
SUFFIXES = {".py", ".md", ".sh", ".toml", ".cfg", ".txt", ""}

# Spelled in pieces so that this file does not match itself.
FORBIDDEN = {
    "an issue number": re.compile(r"\b" + "issue" + r"s?\s*#?\d+", re.IGNORECASE),
    "'today' (say which version or default)": re.compile(r"\b" + "today", re.IGNORECASE),
    "the private design notes": re.compile("DESIGN" + r"\.md"),
    "the private shared folder": re.compile(r"\.\./" + "shared"),
}


def shipped_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for top in SHIPPED:
        for p in sorted((ROOT / top).rglob("*")):
            # this file names the patterns it forbids
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts and p != Path(__file__).resolve():
                files.append(p)
    return files


def offending_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                out.append(f"{path.relative_to(ROOT)}:{n}: {what}: {line.strip()[:100]}")
    return out


def test_the_patterns_catch_what_they_should():
    # the check itself can fail: each pattern finds its case and leaves ordinary prose alone
    assert FORBIDDEN["an issue number"].search("see Issue 18, part 3")
    assert FORBIDDEN["an issue number"].search("(issues #21)")
    assert not FORBIDDEN["an issue number"].search("an issue with 3 images")
    assert FORBIDDEN["'today' (say which version or default)"].search("Today's default")
    assert not FORBIDDEN["'today' (say which version or default)"].search("the current default")
    assert FORBIDDEN["the private design notes"].search("as " + "DESIGN" + ".md says")
    assert FORBIDDEN["the private shared folder"].search("see .." + "/shared/seed")


@pytest.mark.parametrize("top", ["README.md", *SHIPPED])
def test_no_private_or_dated_references(top):
    files = [p for p in shipped_files() if p.relative_to(ROOT).parts[0] == top]
    assert files, top
    bad = [line for p in files for line in offending_lines(p)]
    assert not bad, "cite what a reader can open, say why not when:\n" + "\n".join(bad)
