"""Thread defaults: the decision rule, the environment set before torch, the --threads flag, DataLoader workers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from gmae.runtime import threads
from gmae.cli import COMPUTING, build_parser, main
from gmae.errors import GMAEError


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize("cores,procs,env,requested,expected", [
    (2, 1, {}, None, 2),  # alone: every usable core
    (2, 2, {}, None, 1),  # torchrun --nproc-per-node=2 on 2 cores
    (16, 3, {}, None, 5),  # rounded down: never more threads than cores
    (2, 4, {}, None, 1),  # more processes than cores: still one each
    (8, 1, {"OMP_NUM_THREADS": "3"}, None, 3),  # the user's variable wins over the core count
    (8, 1, {"OMP_NUM_THREADS": "4,2"}, None, 4),  # libgomp's nested form: the outer level
    (8, 2, {"OMP_NUM_THREADS": "nonsense"}, None, 4),  # not a number: ignored
    (8, 2, {"OMP_NUM_THREADS": "0"}, None, 4),
    (8, 1, {"OMP_NUM_THREADS": "3"}, 6, 6),  # the flag wins over everything
    (1, 1, {}, 4, 4),  # and may ask for more threads than cores
])
def test_decide(cores, procs, env, requested, expected):
    assert threads.decide(cores, procs, env, requested).threads == expected


def test_decide_says_why():
    assert threads.decide(4, 2, {}).reason == "4 usable cores / 2 local processes"
    assert threads.decide(4, 1, {"OMP_NUM_THREADS": "3"}).reason == "OMP_NUM_THREADS=3"
    assert threads.decide(4, 1, {"OMP_NUM_THREADS": "3"}, 2).reason == "--threads"


def test_zero_threads_is_a_user_error():
    with pytest.raises(GMAEError, match="--threads must be at least 1; got 0"):
        threads.decide(2, 1, {}, 0)


def test_local_processes_from_torchrun():
    assert threads.local_processes({}) == 1
    assert threads.local_processes({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert threads.local_processes({"LOCAL_WORLD_SIZE": "x"}) == 1


def test_usable_cores_follow_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert threads.usable_cores() == len(os.sched_getaffinity(0))
    assert threads.usable_cores() >= 1


def test_passive_wait_policy_only_where_unset():
    assert threads.environment_defaults({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert threads.environment_defaults({"OMP_WAIT_POLICY": "active"}) == {}


# --------------------------------------------------------------------------- the CLI sets it before torch

_BEFORE_TORCH = """
import os, sys
import gmae.cli as cli
assert "torch" not in sys.modules
build = cli.build_parser
def spy():  # build_parser is where torch is first imported
    print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
    return build()
cli.build_parser = spy
try:
    cli.main(["info", "--help"])
except SystemExit:
    pass
"""


@pytest.mark.parametrize("user,seen", [(None, "PASSIVE"), ("active", "active")])
def test_cli_sets_wait_policy_before_torch_never_over_the_user(user, seen):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user:
        env["OMP_WAIT_POLICY"] = user
    done = subprocess.run([sys.executable, "-c", _BEFORE_TORCH], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"{seen} False"


# --------------------------------------------------------------------------- configure and --threads


@pytest.fixture
def fresh(monkeypatch):
    """A process in which no thread default has been applied yet; torch's and numba's counts restored after."""
    monkeypatch.setattr(threads, "_APPLIED", None)
    monkeypatch.setattr(threads, "_ADDED", set())
    monkeypatch.setenv("NUMBA_NUM_THREADS", "unset-by-fixture")
    monkeypatch.delenv("NUMBA_NUM_THREADS")  # recorded, so restored after the test
    before = torch.get_num_threads()
    numba = sys.modules.get("numba")
    numba_before = numba.get_num_threads() if numba else None
    yield
    torch.set_num_threads(before)
    if numba:
        numba.set_num_threads(numba_before)


def test_configure_sets_torch_and_numba_and_logs_once(fresh, monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    caplog.set_level("INFO", logger="gmae.runtime.threads")
    decision = threads.configure(None)
    assert decision.threads == max(1, threads.usable_cores()) and torch.get_num_threads() == decision.threads
    torch.set_num_threads(1)  # the caller's own choice since ...
    threads.configure(None)  # ... is not reset by a second default
    assert torch.get_num_threads() == 1
    threads.configure(3)  # an explicit number always applies
    assert torch.get_num_threads() == 3
    if "numba" in sys.modules:
        assert sys.modules["numba"].get_num_threads() == min(3, sys.modules["numba"].config.NUMBA_NUM_THREADS)
    else:
        assert os.environ["NUMBA_NUM_THREADS"] == "3"  # the pool numba starts with, once imported
    lines = [r.getMessage() for r in caplog.records if r.name == "gmae.runtime.threads"]
    assert len(lines) == 1 and "threads per process" in lines[0], lines


def test_every_computing_command_takes_threads():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert ("--threads" in flags) == (name in COMPUTING), name
    assert {"pretrain", "reconstruct", "layers", "edges", "segment", "gaussians", "eval-zeroshot", "ablate", "info",
            "bench", "probe", "finetune", "detect"} == set(COMPUTING)


def test_threads_flag_reaches_configure(fresh, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(threads, "configure", lambda n: seen.append(n))
    assert main(["probe", "--checkpoint", str(tmp_path / "none.pt"), "--threads", "3"]) == 2  # fails after configuring
    assert main(["probe", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert main(["export", str(tmp_path / "none.pt"), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert main(["info", str(tmp_path / "none.pt"), "--threads", "2"]) == 2  # info runs its model on a few images
    assert seen == [3, None, 2]  # export computes nothing: no thread setup


def test_pretrain_runs_with_threads_flag(fresh, tmp_path):
    args = ["pretrain", "--img-size", "32", "--patch-size", "8", "-k", "8", "--batch-size", "2", "--steps", "1",
            "--quiet", "--out", str(tmp_path), "--threads", "1"]
    assert main(args) == 0
    assert torch.get_num_threads() == 1


def test_zero_threads_is_one_line(capsys, tmp_path):
    assert main(["pretrain", "--threads", "0", "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "gmae pretrain: error: --threads must be at least 1; got 0"


# --------------------------------------------------------------------------- DataLoader workers


class PoolSizes(Dataset):
    """Reports, from inside a DataLoader worker, the thread count of every pool it can use."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        sizes = {"torch": torch.get_num_threads()}
        if "numba" in sys.modules:
            sizes["numba"] = sys.modules["numba"].get_num_threads()
        try:
            from threadpoolctl import threadpool_info

            sizes.update((f"{p['internal_api']}:{p['filepath']}", p["num_threads"]) for p in threadpool_info())
        except ImportError:
            pass
        return json.dumps(sizes)


def test_dataloader_workers_get_one_thread_each():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's pools are bigger than one
    try:
        import numba

        numba.get_num_threads()  # numba loaded (and its pool started) in the parent, as after a render
        loader = DataLoader(PoolSizes(), batch_size=None, num_workers=1, worker_init_fn=threads.worker_init)
        sizes = json.loads(next(iter(loader)))
    finally:
        torch.set_num_threads(before)
    assert sizes["torch"] == 1 and sizes["numba"] == 1
    assert all(n == 1 for n in sizes.values()), sizes  # numpy's BLAS and OpenMP too, where threadpoolctl sees them


class LoaderBuilt(Exception):
    """Raised by the spy once the loader under test was built: the run stops there."""


def test_training_loaders_give_their_workers_one_thread(tmp_path, monkeypatch):
    """pretrain's and finetune's loaders: whatever worker_init_fn they pass, a worker started with it runs
    one thread (the spy stops each run at its loader and starts a real worker with that function)."""
    from gmae import train
    from gmae.config import FinetuneConfig, model_config, train_config
    from gmae.evaluate import finetune

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("worker_init_fn"))
        raise LoaderBuilt

    for module in (train, finetune):
        monkeypatch.setattr(module, "DataLoader", spy)
    mcfg = model_config("tiny", img_size=32, patch_size=8, num_gaussians=8, depth=1, decoder_depth=1)
    with pytest.raises(LoaderBuilt):
        train.pretrain(mcfg, train_config("tiny", steps=1, batch_size=2, num_workers=1, out=str(tmp_path / "p")),
                       progress=False)
    from gmae.evaluate.probe import random_encoder

    with pytest.raises(LoaderBuilt):
        finetune.finetune(FinetuneConfig(data="digits", steps=1, batch_size=2, num_workers=1, out=str(tmp_path / "f")),
                          progress=False, encoder=random_encoder(mcfg), mcfg=mcfg)
    assert len(seen) == 2
    import numba

    before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))  # the parent's pools hold more than one
    try:
        for init in seen:
            sizes = json.loads(next(iter(DataLoader(PoolSizes(), batch_size=None, num_workers=1, worker_init_fn=init))))
            assert all(n == 1 for n in sizes.values()), (init, sizes)
    finally:
        torch.set_num_threads(before)
        numba.set_num_threads(numba_before)


def test_feature_extraction_workers_run_one_thread():
    """The probe's loader, run for real: each item reports its worker's thread count as its label."""
    from gmae.config import model_config
    from gmae.evaluate.probe import extract_features, random_encoder

    class Reporting(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            import numba

            return torch.zeros(3, 32, 32), max(torch.get_num_threads(), numba.get_num_threads())

    encoder = random_encoder(model_config("tiny", img_size=32, patch_size=8, depth=1))
    import numba

    before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(2)
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        _, labels = extract_features(encoder, Reporting(), batch_size=1, progress=False, num_workers=1)
    finally:
        torch.set_num_threads(before)
        numba.set_num_threads(numba_before)
    assert labels.tolist() == [1, 1]


# --------------------------------------------------------------------------- --num-workers auto


class Generated:  # a source that draws its samples (dead-leaves, sprites): no reads_files
    shuffle = False


class Files:  # a source that decodes image files (gmae.data.folder.ImageFolder)
    shuffle = True
    reads_files = True


@pytest.mark.parametrize("value,source,device,cores,procs,expected", [
    ("auto", Generated(), "cuda", 16, 1, 0),  # drawing a scene costs less than handing it over from a worker
    ("auto", Files(), "cpu", 16, 1, 0),  # on the CPU the training threads already take the cores
    ("auto", Files(), "cuda", 2, 1, 2),  # a worker per core
    ("auto", Files(), "cuda:1", 16, 2, 8),  # torchrun --nproc-per-node 2: the cores shared between the processes
    ("auto", Files(), "cuda", 96, 8, 10),  # 12 cores per GPU: MAE's 10 per GPU at most
    ("auto", Files(), "cuda", 1, 1, 0),  # one core: decoding elsewhere overlaps nothing
    ("auto", Files(), "cuda", 3, 2, 0),  # one core per process, likewise
    (3, Generated(), "cpu", 16, 1, 3),  # a number is taken as it is
    (0, Files(), "cuda", 16, 1, 0),
])
def test_auto_workers_per_source_device_and_machine(value, source, device, cores, procs, expected):
    assert threads.resolve_workers(value, source, device, cores, procs) == expected
    assert threads.resolve_workers(value, source, torch.device(device), cores, procs) == expected


def test_the_real_sources_say_whether_they_read_files(tmp_path):
    from PIL import Image

    from gmae.data import build_dataset

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert threads.resolve_workers("auto", build_dataset(str(tmp_path), 8), "cuda", 4, 1) == 4
    assert threads.resolve_workers("auto", build_dataset("deadleaves", 8), "cuda", 4, 1) == 0


@pytest.mark.parametrize("value", ["-1", "two", "1.5", "", True, None])
def test_num_workers_is_auto_or_a_whole_number(value):
    from gmae.config import TrainConfig, parse_workers

    with pytest.raises(GMAEError, match="num-workers must be auto or an integer >= 0"):
        parse_workers(value)
    assert parse_workers("auto") == "auto" and parse_workers("3") == 3 and parse_workers(0) == 0
    assert TrainConfig().num_workers == "auto"


def test_num_workers_flag_takes_auto_and_numbers():
    parser = build_parser()
    for command, extra in (("pretrain", []), ("finetune", ["--checkpoint", "x"])):
        assert parser.parse_args([command, *extra]).num_workers is None  # the config's "auto"
        assert parser.parse_args([command, *extra, "--num-workers", "auto"]).num_workers == "auto"
        assert parser.parse_args([command, *extra, "--num-workers", "3"]).num_workers == 3


def test_auto_workers_on_an_image_folder_give_the_batches_of_none(tmp_path, monkeypatch):
    """Samples are functions of (seed, index): a run whose loader has the workers "auto" gives an image folder on a
    GPU (here 2, on the CPU) logs the losses and ends with the weights of a run that loads in the training process,
    bit for bit."""
    from PIL import Image

    from gmae.config import model_config, train_config
    from gmae.train import pretrain

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (48, 40), (40 * i, 90, 255 - 30 * i)).save(folder / f"{i}.png")
        Image.effect_noise((40, 48), 20 + 10 * i).convert("RGB").save(folder / f"n{i}.jpg")
    made = []

    def as_on_a_gpu(value, source, device):  # the count auto gives on a 2-core machine with a GPU
        made.append(threads.resolve_workers(value, source, "cuda", cores=2, local_procs=1))
        return made[-1]

    monkeypatch.setattr("gmae.train.resolve_workers", as_on_a_gpu)
    mcfg = model_config("tiny", img_size=32, patch_size=8, num_gaussians=8, depth=1, decoder_depth=1)
    runs = {}
    for workers in ("auto", 0):
        out = tmp_path / str(workers)
        pretrain(mcfg, train_config("tiny", data=str(folder), steps=3, batch_size=4, warmup_steps=1, layout_every=0,
                                    num_workers=workers, out=str(out)), progress=False)
        runs[workers] = (torch.load(out / "checkpoint-0000003.pt", weights_only=True)["model"],
                         [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert made == [2, 0]
    (auto_weights, auto_losses), (none_weights, none_losses) = runs["auto"], runs[0]
    assert auto_losses == none_losses and len(auto_losses) == 3
    assert auto_weights.keys() == none_weights.keys()
    assert all(torch.equal(auto_weights[k], none_weights[k]) for k in auto_weights)
