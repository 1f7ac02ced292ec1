"""The experiment drivers (experiments/<study>/) stay runnable: each answers --help, and each uses only gmae's
public names, so that a refactor of a private function cannot silently break the commands behind a report."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVERS = sorted(p for p in (ROOT / "experiments").glob("*/*.py"))


def test_every_study_has_a_driver():
    studies = {p.parent.name for p in DRIVERS}
    assert {"depth", "layout", "probes", "gaussians_per_query"} <= studies, studies


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_driver_answers_help(driver):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(driver), "--help"], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout, done.stdout[:500]


@pytest.mark.parametrize("driver", DRIVERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_driver_uses_only_public_names(driver):
    private = []
    for node in ast.walk(ast.parse(driver.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gmae"):
            private += [f"{node.module}.{a.name} (line {node.lineno})" for a in node.names if a.name.startswith("_")]
    assert not private, f"{driver.relative_to(ROOT)} imports private names: {', '.join(private)}"
