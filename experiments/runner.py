"""What the experiment drivers share: a logged command runner and a resumable `gmae pretrain`.

Each driver puts this folder on sys.path (``sys.path.insert(0, str(Path(__file__).resolve().parents[1]))``)
and imports from here, so that a run folder and its ``commands.txt`` behave the same in every study.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path


def run(cmd: list[str], log: Path, stdout=None, capture: bool = False) -> str:
    """Run `cmd` (raising on failure), after appending it to `log`: the study's commands.txt. Its output goes to
    the file `stdout` if given; with `capture` it is returned (else "")."""
    with open(log, "a") as f:
        f.write(shlex.join(cmd) + (f" > {stdout.name}" if stdout else "") + "\n")
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE if capture else stdout, text=True)
    return done.stdout if capture else ""


def final_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run folder, or None."""
    found = sorted(run_dir.glob("checkpoint-*.pt"))
    return found[-1] if found else None


def train(gmae: str, run_dir: Path, flags: list[str], log: Path, threads=("--threads", "1")) -> None:
    """`gmae pretrain FLAGS` into run_dir (one thread unless `threads` says otherwise); a run cut short resumes,
    a finished one is left alone."""
    if final_checkpoint(run_dir) is None or not (run_dir / "reconstruction.png").exists():
        resume = ["--resume"] if final_checkpoint(run_dir) else []
        run([gmae, "pretrain", "--out", str(run_dir), "--quiet", *threads, *resume, *flags], log)
