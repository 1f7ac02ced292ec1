"""The `gmae` command: pretrain, reconstruct, the readouts (layers, edges, segment, gaussians: one command per
readout registered in gmae.readouts), eval-zeroshot, ablate, info, export, bench, probe, finetune, detect, plot,
submit.

Each sub-command is one small function; mistakes a user can make are raised as
GMAEError and printed as one line (exit status 2). Building the parser and
checking the arguments and paths import no torch (this module and what it
imports at the top are torch-free), so `gmae --help` and usage errors answer
at once; each command imports what it runs only after its checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from ..config.choices import positive_int
from ..config.recipes import recipe_defaults
from ..errors import GMAEError
from ..io.files import check_output_folder, list_checkpoints
from ..readouts import READOUTS
from ..runtime import cluster, threads
from .common import _typed_options
from .detect import add_detect
from .evaluate import add_ablate, add_finetune, add_probe
from .images import add_eval_zeroshot, add_info, add_readouts, add_reconstruct
from .pretrain import add_pretrain
from .tools import add_bench, add_export, add_plot, add_recipes


def add_submit(sub) -> None:
    p = sub.add_parser("submit", help="run gmae pretrain, finetune, detect or probe as a SLURM job through submitit, "
                       f"requeued on a time limit or preemption ({cluster.INSTALL})")
    p.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (default 0: a CPU job)")
    p.add_argument("--tasks-per-node", type=positive_int, default=None,
                   help="processes per node (default: one per GPU, or 1)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None, help="CPU cores per process")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--time", type=cluster.time_minutes, default=60, metavar="LIMIT",
                   help="the job's time limit, as sbatch --time: minutes, H:MM:SS or D-HH:MM:SS (default 60 minutes); "
                        "the job requeues itself when it is reached")
    p.add_argument("--signal-delay", type=positive_int, default=120, metavar="S",
                   help="seconds before the time limit at which the run is told to save and requeue (default 120)")
    p.add_argument("--folder", default=None,
                   help="folder for submitit's job files and each task's log (default: the command's --out/submitit; "
                        "needed for probe, which has no --out)")
    p.add_argument("--name", default="gmae", help="the job's name (default gmae)")
    p.add_argument("--slurm", type=cluster.key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a further sbatch option, e.g. --slurm account=myproj --slurm qos=high (repeatable)")
    p.add_argument("--cluster", default=None, choices=("slurm", "local"),
                   help="slurm (default when sbatch is available) or local: the tasks on this machine, for a test")
    p.add_argument("--wait", action="store_true", help="wait for the job to end and report how it ended")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help=f"the command to run, with its flags: {', '.join(cluster.SUBMITTABLE)} ... (pretrain, "
                        "finetune and detect run with --resume=auto)")
    p.set_defaults(func=cmd_submit)


class TrainingJob:
    """What each task of a submitted job runs: `gmae COMMAND ...` in this process, under torch.distributed when
    the job has several tasks. Checkpointable: its requeue runs the same command (which has --resume=auto)."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            dist = submitit.helpers.TorchDistributedEnvironment()
            if job.cluster in ("local", "debug"):
                dist.master_addr = "127.0.0.1"  # one machine: no name lookup
            # Each process picks its GPU by LOCAL_RANK (gmae.runtime.distributed), so all stay visible.
            dist.export(set_cuda_visible_devices=False, overwrite=True)
        from ..runtime.stopping import STOPPED_EXIT, Stopped

        try:
            status = run(self.argv)
        except Stopped as stop:
            print(f"gmae {self.argv[0]}: {stop}", file=sys.stderr, flush=True)
            if stop.signum != job._usr_sig() and stop.signal_name != "SIGUSR1":
                raise SystemExit(STOPPED_EXIT) from None  # SIGTERM: cancelled, or preempted (SLURM requeues)
            self._requeue(job, stop.signum)
            return STOPPED_EXIT  # a task other than the first: the first requeues the job
        if status:
            raise RuntimeError(f"gmae {' '.join(self.argv)} exited with status {status}; see this task's log")
        return status

    @staticmethod
    def _requeue(job, signum: int) -> None:
        """The time limit's signal: requeue the job as submitit does on it (task 0 only; it exits)."""
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission

        paths = job.paths
        SignalHandler(job, paths, DelayedSubmission.load(paths.submitted_pickle)).checkpoint_and_try_requeue(signum)

    def checkpoint(self, *args, **kwargs):
        """submitit's hook on requeue: the same command, which continues with --resume=auto."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.argv))


def _check_job(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """gmae submit: the command to run must be one of cluster.SUBMITTABLE, with flags that parse."""
    if not args.job or args.job[0] not in cluster.SUBMITTABLE:
        given = f"; got {args.job[0]!r}" if args.job else ""
        parser.commands["submit"].error(f"give the command to run after submit's own flags: "
                                        f"{', '.join(cluster.SUBMITTABLE)} with its flags{given}")
    args.job_args = parse_args(args.job)


def cmd_submit(args) -> int:
    inner = args.job_args
    resuming = args.job[0] in cluster.RESUMING  # the probe writes no checkpoints: nothing to check or continue
    if resuming:
        check_output_folder(inner.out)
        saved = list_checkpoints(inner.out)
        if not inner.resume and saved:
            raise GMAEError(f"{inner.out} already holds checkpoints of another run; add --resume to continue it "
                            "or choose a new --out")
        if inner.resume is True and not saved:
            raise GMAEError(f"--resume: there is no checkpoint in {inner.out} to continue; drop --resume to start "
                            "a new run there (the job continues its own checkpoints when requeued)")
    elif not args.folder:
        raise GMAEError(f"gmae {args.job[0]} has no --out: give submit's --folder for the job's files and logs")
    folder = args.folder or str(Path(inner.out) / "submitit")
    check_output_folder(folder)
    job = cluster.submit(TrainingJob(cluster.job_command(args.job)), folder, cluster=args.cluster, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                         partition=args.partition, time_min=args.time, name=args.name,
                         signal_delay_s=args.signal_delay, slurm=dict(args.slurm))
    print(f"submitted job {job.job_id}: gmae {' '.join(args.job)}" + (" (it runs with --resume=auto)" if resuming else ""))
    print(f"logs:  {folder}/{job.job_id}_*_log.out and .err (one per task)")
    if resuming:
        print(f"where it stands: gmae info {inner.out}   gmae plot {inner.out} --out curves.png")
    if not args.wait:
        return 0
    try:
        job.results()  # every task's
    except Exception as e:  # submitit's UncompletedJobError / FailedJobError: the task's traceback is in its log
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GMAEError(f"job {job.job_id} did not finish ({first}); see {folder}/{job.job_id}_0_log.err") from None
    print(f"job {job.job_id} finished: " + (str(list_checkpoints(inner.out)[-1]) if resuming else
                                            f"the first task's results are in {folder}/{job.job_id}_0_log.out"))
    return 0


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, but a line never breaks inside a hyphenated word, so that a flag named in a help text
    (--num-workers) stays whole and can be searched for."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (with where to look), not the whole usage block; every command's
    parser is one (argparse makes sub-commands of the parser's own class) and lays out its help with HelpFormatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# The commands that compute with torch (and so take --threads; info runs its model on a few images); export only
# reads and writes files.
# The commands that train data-parallel over the processes of a torchrun or srun job (the probe: --protocol mae).
DATA_PARALLEL = ("pretrain", "finetune", "probe", "detect")
COMPUTING = ("pretrain", "reconstruct", *READOUTS, "eval-zeroshot", "ablate", "info", "bench", "probe", "finetune",
             "detect")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gmae", description="Gaussian Masked Autoencoders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_pretrain, add_reconstruct, add_readouts, add_eval_zeroshot, add_ablate, add_info, add_export, add_bench,
                add_probe, add_finetune, add_detect, add_recipes, add_plot, add_submit):
        add(sub)
    parser.commands = sub.choices  # {name: its parser}, so that its own errors name it
    # gmae recipes shows a recipe's values under the flags of the command it is for
    sub.choices["recipes"].set_defaults(commands=sub.choices)
    for name in COMPUTING:
        sub.choices[name].add_argument(
            "--threads", type=int, default=None, metavar="N",
            help="CPU threads of this process (default: OMP_NUM_THREADS if set, else usable cores / processes "
                 "on this machine under torchrun)")
    return parser


def _apply_recipe(p: argparse.ArgumentParser, command: str, name: str) -> None:
    """Make recipe `name`'s values the defaults of `command`'s parser `p` (its actions' own defaults, not
    set_defaults', so that _typed_options still sees only what was typed)."""
    actions = {a.dest: a for a in p._actions if a.option_strings}
    try:
        values = recipe_defaults(name, command, actions)
    except GMAEError as e:
        p.error(str(e))
    for dest, value in values.items():
        actions[dest].default = value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of one command; a flag that command does not know is reported by that command."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "recipe", None):  # the recipe's values become the defaults; then what was typed wins
        _apply_recipe(parser.commands[args.command], args.command, args.recipe)
        args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.typed = _typed_options(parser, argv, args.command)  # what --resume compares with the saved settings
    if args.command == "submit":
        _check_job(parser, args)
    return args


def _interrupted(args) -> str:
    """What a Ctrl-C leaves behind, said for the command that was running."""
    if args.command in ("pretrain", "finetune", "detect"):
        from ..io.files import list_checkpoints

        kept = list_checkpoints(args.out)
        if kept:
            return f"interrupted; {args.out} keeps its checkpoints up to {kept[-1].name}: add --resume to continue"
        return f"interrupted before the first checkpoint, so {args.out} holds nothing to resume; run again to start over"
    if args.command == "ablate":
        return "interrupted; finished runs, scores and checkpoints are kept: run the same command again to continue"
    return "interrupted"


def main(argv: list[str] | None = None) -> int:
    """The `gmae` command; a run stopped by a signal (gmae.runtime.stopping) says so and exits with STOPPED_EXIT (75)."""
    from ..runtime.stopping import STOPPED_EXIT, Stopped

    try:
        return run(argv)
    except Stopped as stop:
        print(f"gmae {(sys.argv[1:] if argv is None else argv)[0]}: {stop}", file=sys.stderr)
        return STOPPED_EXIT


def run(argv: list[str] | None = None) -> int:
    """main without the handling of a signal's stop: a stopped pretrain, finetune or detect raises
    gmae.runtime.stopping.Stopped."""
    # Before anything imports torch: OpenMP reads its wait policy once, when torch loads it.
    threads.prepare_environment()
    args = parse_args(argv)
    if args.command in DATA_PARALLEL:  # `srun gmae pretrain` with several tasks: data-parallel, as under torchrun
        os.environ.update(cluster.slurm_task_env())
    try:
        if args.command in COMPUTING:
            threads.configure(args.threads)
        return args.func(args)
    except GMAEError as e:
        print(f"gmae {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gmae {args.command}: {_interrupted(args)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
