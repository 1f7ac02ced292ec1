"""Cluster readiness: a signal stops a run at a step boundary with that step's checkpoint, on every
rank alike; torchrun --max-restarts resumes after a lost worker; `gmae submit` runs through submitit's local
executor (2 tasks, gloo) and requeues itself on the time-limit signal. CPU only, a few tiny steps each."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gmae.io.checkpoint import list_checkpoints

from gmae.io.loader import load
from gmae.cli import main
from gmae.runtime.cluster import first_host, slurm_task_env, time_minutes
from gmae.config import model_config, train_config
from gmae.evaluate.finetune import finetune
from gmae.runtime.stopping import STOP_SIGNALS, STOPPED_EXIT, Stopped
from gmae.train import pretrain
from test_finetune import colours, fast  # noqa: F401 (fixtures; ckpt comes from conftest)
from test_reliability import FAST, TIMEOUT, metrics, start

ENV = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")  # 2-process runs: a thread each
DDP_STEPS = 6


def cmd(out: Path, steps: int, *extra: str, launcher: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, *launcher, "-m", "gmae", "pretrain", *FAST, "--steps", str(steps), "--warmup-steps", "1",
            "--out", str(out), *extra]


def torchrun(*flags: str) -> tuple[str, ...]:
    return ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *flags)


def launch(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=log.parent)


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=3 * TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args} did not finish:\n{log.read_text()[-3000:]}")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]  # a pre-training or a fine-tuning checkpoint


def assert_bitwise_equal(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{a} and {b} differ in {different[:5]}"


def descendants(root: int) -> list[int]:
    """PIDs of every process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_with(root: int, key: str, value: str) -> int | None:
    """The process below `root` started with `key`=`value` in its environment (a rank, a task)."""
    for pid in descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{key}={value}".encode() in env and b"OMP_NUM_THREADS=1" in env:
            return pid
    return None


def when(condition, proc: subprocess.Popen, log: Path, what: str):
    """Poll until `condition()` is truthy (returns it); None if `proc` ends first."""
    deadline = time.monotonic() + 3 * TIMEOUT
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            return None
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"waited in vain for {what}:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory):
    """An uninterrupted 2-process torchrun run of DDP_STEPS steps, checkpoints every 2 steps."""
    out = tmp_path_factory.mktemp("ddp") / "ref"
    log = out.parent / "ref.log"
    assert finish(launch(cmd(out, DDP_STEPS, "--checkpoint-every", "2", launcher=torchrun()), log), log) == 0, \
        log.read_text()[-3000:]
    return out


# --------------------------------------------------------------------------- one process


def test_sigterm_stops_at_the_step_it_arrives_in_and_resume_is_bitwise_exact(tmp_path):
    steps = 8
    ref = launch(cmd(tmp_path / "ref", steps), tmp_path / "ref.log")  # runs alongside
    out, log = tmp_path / "run", tmp_path / "run.log"
    target = random.randint(1, steps - 4)  # a random step, leaving room to land mid-run
    for attempt in range(3):
        proc = launch(cmd(out, steps, "--checkpoint-every", "100"), log)
        seen = when(lambda: len(metrics(out)) >= target and len(metrics(out)), proc, log, "the target step")
        if seen is not None:
            os.kill(proc.pid, signal.SIGTERM)
            break
        finish(proc, log)
        shutil.rmtree(out)
    else:
        pytest.fail("the run always finished before the signal")
    status = finish(proc, log)
    text = log.read_text()
    assert status == STOPPED_EXIT, text
    saved = list_checkpoints(out)
    assert len(saved) == 1, saved  # no scheduled checkpoint before the end: the signal's
    stop = load(saved[0], "checkpoint")["step"]
    print(f"SIGTERM after {seen} logged steps: stopped at step {stop}, exit status {status}")
    assert stop in (seen, seen + 1), "the run went on past the step the signal arrived in"
    assert len(metrics(out)) == stop  # exactly the steps the checkpoint holds were logged
    assert f"gmae pretrain: stopped by SIGTERM at step {stop} of {steps}: saved {saved[0]}; continue with --resume" in text

    resume_log = tmp_path / "resume.log"
    assert finish(launch(cmd(out, steps, "--checkpoint-every", "100", "--resume"), resume_log), resume_log) == 0
    assert f"resumed from {saved[0].name} (step {stop})" in resume_log.read_text()
    assert finish(ref, tmp_path / "ref.log") == 0
    assert_bitwise_equal(out / f"checkpoint-{steps:07d}.pt", tmp_path / "ref" / f"checkpoint-{steps:07d}.pt")
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(tmp_path / "ref")]


def test_a_second_signal_during_the_save_is_ignored_and_handlers_come_back(tmp_path, monkeypatch):
    """SIGUSR1 in step 2 stops the run after it; a SIGTERM sent while that checkpoint is written changes
    nothing; the checkpoint reads and holds step 3; the process's own handlers are back afterwards."""
    import gmae.train as train
    import gmae.train.engine as engine

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    real_lr, real_save = train.learning_rate, engine.save_checkpoint
    sent = []

    def lr(step, cfg):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_lr(step, cfg)

    def save(state, path, keep=None):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, mid-save
        sent.append(state["step"])
        return real_save(state, path, keep=keep)

    monkeypatch.setattr(train, "learning_rate", lr)
    monkeypatch.setattr(engine, "save_checkpoint", save)
    mcfg = model_config("tiny", img_size=32, patch_size=8, num_gaussians=32)
    tcfg = train_config("tiny", steps=6, batch_size=4, warmup_steps=1, checkpoint_every=100, out=str(tmp_path))
    with pytest.raises(Stopped) as stopped:
        pretrain(mcfg, tcfg, progress=False)
    assert (stopped.value.signal_name, stopped.value.step, sent) == ("SIGUSR1", 3, [3])
    assert load(tmp_path / "checkpoint-0000003.pt", "checkpoint")["step"] == 3
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


# A process that saved a checkpoint, entered the guard and then never reaches a step boundary (a hung loader, a
# CPU step of minutes): SIGNALS are sent to itself, then it "trains" for a minute.
HUNG_STEP = """
import os, signal, sys, time
from gmae.io.checkpoint import save_checkpoint
from gmae.runtime.stopping import StopGuard
out, grace, gaps = sys.argv[1], float(sys.argv[2]), [float(g) for g in sys.argv[3:]]
from gmae.io.checkpoint import FORMAT
save_checkpoint({{"format": FORMAT, "step": 7, "model": {{}}}}, os.path.join(out, "checkpoint-0000007.pt"))
with StopGuard(grace, out) as guard:
    for gap in gaps:
        time.sleep(gap)
        os.kill(os.getpid(), signal.SIGTERM)
    started = time.monotonic()
    while time.monotonic() - started < 60:
        time.sleep(0.05)
print("the step ended", guard.signum)
"""


def hung_step(tmp_path, grace, *gaps):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HUNG_STEP.format(), str(tmp_path), str(grace), *map(str, gaps)],
                          capture_output=True, text=True, timeout=120, env=env)
    return done, time.monotonic() - started


def test_a_step_that_outlasts_the_grace_period_is_ended_by_it(tmp_path):
    done, seconds = hung_step(tmp_path, 1.0, 0.0)
    assert done.returncode == STOPPED_EXIT and seconds < 30, (done.returncode, seconds, done.stderr)
    assert "no step ended within 1 s of SIGTERM: exiting now" in done.stderr
    assert f"the checkpoints saved in {tmp_path} are intact" in done.stderr
    assert load(tmp_path / "checkpoint-0000007.pt", "checkpoint")["step"] == 7


def test_a_second_signal_before_the_step_ends_exits_at_once(tmp_path):
    done, seconds = hung_step(tmp_path, 0, 0.0, 2.5)  # no grace limit: only the second signal ends it
    assert done.returncode == STOPPED_EXIT and seconds < 30, (done.returncode, seconds, done.stderr)
    assert "a second signal (SIGTERM) before the step ended: exiting now" in done.stderr
    assert load(tmp_path / "checkpoint-0000007.pt", "checkpoint")["step"] == 7


def test_one_stop_delivered_twice_is_one_stop():
    """SLURM signals every process of a step and torchrun forwards what it receives: the same SIGTERM can come
    twice within a moment. That is not a second request; the run still stops at its step boundary."""
    from gmae.runtime.stopping import StopGuard

    with StopGuard(0) as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert guard.signum == signal.SIGTERM  # still here: the process did not exit


def test_finetune_stops_on_a_signal_and_resumes_exactly(tmp_path, ckpt, colours, monkeypatch):  # noqa: F811
    import gmae.evaluate.finetune as ft

    full, cut = tmp_path / "full", tmp_path / "cut"
    finetune(fast(full, checkpoint=str(ckpt), data=str(colours), batch_size=6), progress=False)
    real_lr = ft.learning_rate

    def lr(step, cfg):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_lr(step, cfg)

    monkeypatch.setattr(ft, "learning_rate", lr)
    with pytest.raises(Stopped, match="stopped by SIGTERM at step 2 of 6"):
        finetune(fast(cut, checkpoint=str(ckpt), data=str(colours), batch_size=6), progress=False)
    assert [p.name for p in list_checkpoints(cut)] == ["checkpoint-0000002.pt"]
    monkeypatch.setattr(ft, "learning_rate", real_lr)
    finetune(fast(cut, checkpoint=str(ckpt), data=str(colours), batch_size=6), resume=True, progress=False)
    assert_bitwise_equal(full / "checkpoint-0000006.pt", cut / "checkpoint-0000006.pt")


# --------------------------------------------------------------------------- torchrun


def stop_rank_1(command: list[str], out: Path, log: Path) -> int:
    """Run a 2-process torchrun `command` writing `out`, send SIGUSR1 to rank 1 alone after 2 logged steps, and
    return the step both ranks stopped at (it asserts that they said so, at the same step)."""
    proc = launch(command, log)
    rank1 = when(lambda: len(metrics(out)) >= 2 and process_with(proc.pid, "RANK", "1"), proc, log, "rank 1")
    assert rank1, f"the run ended before the signal:\n{log.read_text()[-3000:]}"
    os.kill(rank1, signal.SIGUSR1)  # rank 1 only
    assert finish(proc, log) != 0  # torchrun reports its workers' status 75 as a failure
    text = log.read_text()
    stops = {int(r): int(s) for r, s in re.findall(r"rank (\d) of 2: stopped by SIGUSR1 at step (\d+)", text)}
    assert set(stops) == {0, 1}, text[-3000:]
    assert stops[0] == stops[1], stops
    print(f"SIGUSR1 to rank 1: both ranks stopped at step {stops[0]}")
    return stops[0]


def test_a_signal_to_one_rank_stops_both_at_the_same_step(tmp_path):
    steps = 10
    out, log = tmp_path / "run", tmp_path / "run.log"
    stop = stop_rank_1(cmd(out, steps, "--checkpoint-every", "100", launcher=torchrun()), out, log)
    assert stop < steps
    assert [load(p, "checkpoint")["step"] for p in list_checkpoints(out)] == [stop]
    assert len(metrics(out)) == stop


def test_what_counts_as_a_collective_timeout():
    from gmae.runtime.distributed import timed_out

    assert timed_out(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 3000ms for send "
                                  "operation to complete"))
    assert timed_out(RuntimeError("Application timeout caused pair closure"))
    assert timed_out(RuntimeError("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7)"))
    assert not timed_out(RuntimeError("CUDA out of memory"))
    assert not timed_out(RuntimeError("the DataLoader timeout must be positive"))
    assert not timed_out(ValueError("timed out waiting"))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_joins_the_collective_ends_the_other_within_the_timeout(tmp_path):
    """Two ranks as torchrun starts them (gloo); once a checkpoint is saved, rank 1 is stopped (SIGSTOP: alive, its
    sockets open, never joining another collective). Rank 0 waits in the step's all-reduce until --dist-timeout
    (3 s) passes, then exits with status 2 and one line naming its rank; the newest checkpoint still loads."""
    out = tmp_path / "run"
    port, procs, logs = free_port(), [], []
    for rank in (0, 1):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        logs.append(tmp_path / f"rank{rank}.log")
        with open(logs[-1], "wb") as f:
            procs.append(subprocess.Popen(cmd(out, 1000, "--checkpoint-every", "2", "--dist-timeout", "3"),
                                          stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
    try:
        assert when(lambda: list_checkpoints(out), procs[0], logs[0], "a checkpoint"), logs[0].read_text()[-3000:]
        os.kill(procs[1].pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = procs[0].wait(timeout=3 * TIMEOUT)
        waited = time.monotonic() - stopped_at
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    text = logs[0].read_text()
    errors = [line for line in text.splitlines() if "error:" in line or "Traceback" in line]
    assert code == 2, text[-3000:]
    assert errors == ["gmae pretrain: error: rank 0 of 2: a collective waited more than --dist-timeout 3 s for the "
                      "other processes (one of them hung, stopped or died); the checkpoints already saved are "
                      "intact: restart with --resume=auto"], text[-3000:]
    print(f"rank 1 stopped: rank 0 ended {waited:.1f} s later")
    assert waited < 3 + 30  # the timeout, and at most the step it was in on a busy machine
    newest = list_checkpoints(out)[-1]
    assert load(newest, "checkpoint")["step"] % 2 == 0


def kill_rank_1_and_restart(command: list[str], out: Path, log: Path) -> int:
    """Run a torchrun `command` (with --max-restarts and --resume=auto) writing `out`, SIGKILL rank 1 once a
    checkpoint is saved, and return the step the restarted workers resumed from (asserting the run finished)."""
    proc = launch(command, log)
    victim = when(lambda: list_checkpoints(out) and len(metrics(out)) >= 3 and process_with(proc.pid, "RANK", "1"),
                  proc, log, "a checkpoint and rank 1")
    assert victim, f"the run ended before the kill:\n{log.read_text()[-3000:]}"
    os.kill(victim, signal.SIGKILL)
    status = finish(proc, log)
    text = log.read_text()
    assert status == 0, text[-3000:]
    resumed = re.findall(r"resumed from checkpoint-(\d+)\.pt", text)
    assert resumed, f"the restarted workers did not resume:\n{text[-3000:]}"
    print(f"rank 1 killed with SIGKILL; torchrun restarted the workers, which resumed from step {int(resumed[0])}")
    return int(resumed[0])


def test_max_restarts_resumes_from_the_newest_checkpoint_after_a_lost_worker(tmp_path, ddp_reference):
    out, log = tmp_path / "run", tmp_path / "run.log"
    kill_rank_1_and_restart(cmd(out, DDP_STEPS, "--checkpoint-every", "2", "--resume=auto",
                                launcher=torchrun("--max-restarts", "1")), out, log)
    final = f"checkpoint-{DDP_STEPS:07d}.pt"
    assert_bitwise_equal(out / final, ddp_reference / final)


# --------------------------------------------------------------------------- gmae submit


def test_submit_through_the_local_executor_requeues_and_matches_torchrun(tmp_path, ddp_reference):
    pytest.importorskip("submitit")
    out, folder, log = tmp_path / "run", tmp_path / "jobs", tmp_path / "submit.log"
    command = [sys.executable, "-m", "gmae", "submit", "--cluster", "local", "--tasks-per-node", "2", "--time", "10",
               "--folder", str(folder), "--wait", *cmd(out, DDP_STEPS, "--checkpoint-every", "2")[3:]]
    proc = launch(command, log)
    # The time limit's signal (submitit's SIGUSR2) to task 1 only, once two steps are logged.
    task1 = when(lambda: len(metrics(out)) >= 2 and process_with(proc.pid, "SUBMITIT_LOCAL_GLOBALID", "1"),
                 proc, log, "task 1")
    assert task1, f"the job ended before the signal:\n{log.read_text()[-3000:]}"
    os.kill(task1, signal.SIGUSR2)
    status = finish(proc, log)
    text = log.read_text()
    task_logs = "".join(p.read_text() for p in sorted(folder.glob("*_log.*")))
    assert status == 0, text[-2000:] + task_logs[-3000:]
    assert "finished" in text
    stop = re.search(r"rank 0 of 2: stopped by SIGUSR2 at step (\d+)", task_logs)
    assert stop and "Requeued job" in task_logs, task_logs[-3000:]
    assert f"resumed from checkpoint-{int(stop.group(1)):07d}.pt" in task_logs
    print(f"gmae submit (local, 2 tasks): SIGUSR2 at step {stop.group(1)}, requeued, resumed and finished")
    final = f"checkpoint-{DDP_STEPS:07d}.pt"
    a, b = weights(out / final), weights(ddp_reference / final)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"submit vs torchrun: worst weight difference {worst:.1e}")
    assert worst <= 1e-5


def test_submit_without_submitit_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    assert main(["submit", "--cluster", "local", "pretrain", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gmae submit: error: gmae submit needs submitit, which is not installed; pip install 'gmae[cluster]'"


@pytest.mark.parametrize("argv, message", [
    (["submit"], "give the command to run after submit's own flags: pretrain, finetune, detect, probe"),
    (["submit", "info", "runs/x"], "got 'info'"),
    (["submit", "--time", "soon", "pretrain"], "expected minutes, H:MM:SS or D-HH:MM:SS"),
    (["submit", "pretrain", "--steps", "0"], "gmae pretrain: error: argument --steps: must be at least 1"),
])
def test_submit_usage_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_submit_refuses_a_folder_of_another_run(tmp_path, capsys):
    pytest.importorskip("submitit")
    (tmp_path / "checkpoint-0000002.pt").write_bytes(b"")
    assert main(["submit", "--cluster", "local", "pretrain", "--out", str(tmp_path)]) == 2
    assert "already holds checkpoints of another run; add --resume" in capsys.readouterr().err
    assert not (tmp_path / "submitit").exists()  # nothing submitted


# --------------------------------------------------------------------------- srun without torchrun


def test_srun_tasks_get_torch_distributed_variables():
    env = {"SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    assert slurm_task_env(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                                   "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 123456 % 40000)}
    set_here = slurm_task_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "29500"})  # what the script exported wins
    assert "MASTER_ADDR" not in set_here and "MASTER_PORT" not in set_here and set_here["RANK"] == "9"
    # torchrun's own variables, a one-task step, or no srun at all: left alone
    assert slurm_task_env({**env, "RANK": "0", "WORLD_SIZE": "2"}) == {}
    assert slurm_task_env({**env, "SLURM_STEP_NUM_TASKS": "1"}) == {}
    assert slurm_task_env({"SLURM_NTASKS": "16", "SLURM_PROCID": "0"}) == {}
    assert first_host("node-a,node-b") == "node-a"
    assert [time_minutes(t) for t in ("90", "30:30", "72:00:00", "1-12", "2-00:00:01")] == [90, 31, 4320, 2160, 2881]
