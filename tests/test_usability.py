"""What a new user trips over: --out and --resume never lose data, errors come before
any work (and before torch), every command takes every kind of checkpoint, readable figures,
and the tools people expect: gmae plot, --tensorboard, progress, the Python API, probe --baseline."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmae.io.checkpoint import list_checkpoints
from gmae.cli import main

FAST = ["--img-size", "32", "--patch-size", "8", "-k", "32", "--batch-size", "4", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


def steps_of(out) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2, and an export of it."""
    out = tmp_path_factory.mktemp("run")
    assert main(["pretrain", *FAST, "--steps", "2", "--checkpoint-every", "1", "--out", str(out)]) == 0
    assert main(["export", str(out / "checkpoint-0000002.pt"), "--out", str(out.parent / "model.safetensors")]) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


# --------------------------------------------------------------------------- 1. --resume with nothing to resume


def interrupted_before_first_checkpoint(out: Path, lines: int = 5) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"step": s, "loss": 0.5, "lr": 1e-3}) + "\n" for s in range(lines))
    (out / "metrics.jsonl").write_text(text)
    return text


def test_resume_without_a_checkpoint_is_an_error_that_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    before = interrupted_before_first_checkpoint(out)
    assert main(["pretrain", *FAST, "--steps", "2", "--out", str(out), "--resume"]) == 2
    one_line_error(capsys, "no checkpoint", "5 lines", "--resume=auto")
    assert (out / "metrics.jsonl").read_text() == before and sorted(os.listdir(out)) == ["metrics.jsonl"]
    # a folder that does not exist is not created
    assert main(["pretrain", *FAST, "--steps", "2", "--out", str(tmp_path / "none"), "--resume"]) == 2
    one_line_error(capsys, "no checkpoint")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("resume", [[], ["--resume=auto"]])
def test_a_new_run_keeps_the_metrics_of_a_run_without_checkpoints(resume, tmp_path, capsys):
    out = tmp_path / "run"
    before = interrupted_before_first_checkpoint(out)
    assert main(["pretrain", *FAST, "--steps", "2", "--out", str(out), *resume]) == 0
    assert (out / "metrics.old-1.jsonl").read_text() == before  # kept, not erased
    assert steps_of(out) == [0, 1]
    assert "kept as metrics.old-1.jsonl" in capsys.readouterr().err


def test_resume_says_where_it_continues_and_what_it_drops(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "checkpoint-0000002.pt").unlink()  # as if killed after logging step 1, before its checkpoint
    assert main(["pretrain", *FAST, "--steps", "2", "--out", str(out), "--resume=auto"]) == 0
    err = capsys.readouterr().err
    assert "resumed from checkpoint-0000001.pt (step 1)" in err
    assert "dropped 1 line of metrics.jsonl (steps 1-1)" in err
    assert steps_of(out) == [0, 1]


def test_interrupt_message_says_whether_there_is_a_checkpoint(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gmae.train.pretrain", interrupted)
    out = tmp_path / "run"
    assert main(["pretrain", *FAST, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "before the first checkpoint" in err and "--resume" not in err
    out.mkdir()
    (out / "checkpoint-0000400.pt").write_bytes(b"")
    assert main(["pretrain", *FAST, "--out", str(out), "--resume"]) == 130
    assert "checkpoint-0000400.pt: add --resume to continue" in capsys.readouterr().err


# --------------------------------------------------------------------------- 2. one writer per run folder

HOLD = textwrap.dedent("""
    import sys, time
    from gmae.io.files import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_second_writer_is_refused_and_a_dead_holders_lock_is_not_in_the_way(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["pretrain", *FAST, "--steps", "1", "--out", str(out)]) == 2
        one_line_error(capsys, "in use by another gmae process", f"pid {holder.pid}")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: its lock file stays behind
        holder.wait()
    assert (out / ".gmae-lock").exists()
    assert main(["pretrain", *FAST, "--steps", "1", "--out", str(out)]) == 0
    assert steps_of(out) == [0] and not (out / ".gmae-lock").exists()  # released on exit


# --------------------------------------------------------------------------- 3, 4. checked first, without torch

CHECKS = textwrap.dedent("""
    import sys
    from gmae.cli import main

    def code(argv):
        try:
            return main(argv)
        except SystemExit as e:
            return e.code

    file, folder, ckpt = sys.argv[1:4]
    results = [
        code(["--help"]),
        code(["pretrain", "--steps", "-5"]),
        code(["layers", "x.png", "-k", "0", "--checkpoint", ckpt, "--out", folder]),
        code(["pretrain", "--mask-ratio", "1.0"]),
        code(["pretrain", "--out", file]),
        code(["pretrain", "--out", file + "/sub"]),
        code(["reconstruct", folder, "--checkpoint", ckpt, "--out", file]),
        code(["layers", folder, "--checkpoint", ckpt, "--out", file]),
        code(["edges", "missing.png", "--checkpoint", ckpt, "--out", folder]),
        code(["info", "missing.pt"]),
        code(["probe", "--checkpoint", "missing.pt"]),
        code(["export", ckpt, "--out", folder]),
    ]
    print(results, [m for m in ("torch", "numba") if m in sys.modules])
""")


def test_usage_and_path_errors_answer_before_torch_is_imported(run, photos, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("")
    done = subprocess.run([sys.executable, "-c", CHECKS, str(afile), str(photos), str(run)],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == f"{[0] + [2] * 11} []", done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 11 and "Traceback" not in done.stderr, done.stderr
    assert any(f"--out {afile} is a file" in e for e in errors)
    assert any("a-file is a file, so no folder can be made there" in e for e in errors)


def test_read_only_out_is_one_line(run, photos, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root may write anyway: the check is what the permission bits say, as os.access tells it
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if (
            os.path.abspath(path) == str(locked) and mode & os.W_OK) else real(path, mode, **kw))
    try:
        assert main(["reconstruct", str(photos), "--checkpoint", str(run), "--out", str(locked / "figs")]) == 2
        one_line_error(capsys, "not writable")
    finally:
        locked.chmod(stat.S_IRWXU)


# --------------------------------------------------------------------------- 5, 6. folders of images, any checkpoint


def test_a_folder_of_images_and_every_kind_of_checkpoint(run, photos, tmp_path, capsys):
    export = run.parent / "model.safetensors"
    for i, ckpt in enumerate((run, export, run / "checkpoint-0000002.pt")):
        out = tmp_path / f"figs{i}"
        assert main(["layers", str(photos), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
        assert capsys.readouterr().out.split() == [str(out / "a_layers.png"), str(out / "b_layers.png")]
    assert main(["reconstruct", str(photos), "--checkpoint", str(export), "--out", str(tmp_path / "r")]) == 0
    assert sorted(os.listdir(tmp_path / "r")) == ["a_reconstruction.png", "b_reconstruction.png"]
    capsys.readouterr()
    for ckpt in (run, export):
        assert main(["info", str(ckpt), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["step"] == 2 and info["model"]["num_gaussians"] == 32
    assert info["train"] is None  # an export holds the model only
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["segment", str(empty), "--checkpoint", str(run), "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "holds no images")


def test_a_run_folder_gives_its_newest_readable_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    newest = out / "checkpoint-0000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    assert main(["info", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["step"] == 1 and "checkpoint-0000002.pt cannot be read" in captured.err


# --------------------------------------------------------------------------- 7. errors name the command


def test_an_unknown_flag_is_reported_by_its_command(run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["layers", "x.png", "-k", "0", "--checkpoint", str(run), "--out", "figs"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("gmae layers: error: unrecognized arguments: -k")


# --------------------------------------------------------------------------- 8. log lines above the bar


def test_skipped_image_is_logged_above_the_bar_and_counted_in_english(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (40 * i, 90, 200)).save(folder / f"{i}.png")
    (folder / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    args = [a for a in FAST if a != "--quiet"]
    assert main(["pretrain", *args, "--steps", "1", "--data", str(folder), "--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    # tqdm clears the bar's line ('\r') before the message, so the message starts its own line
    said = [line.rsplit("\r", 1)[-1] for line in captured.err.split("\n") if "skipping unreadable image" in line]
    assert len(said) == 1 and said[0].startswith("skipping unreadable image"), captured.err
    assert "0 steps with a non-finite loss, 1 unreadable image\n" in captured.out


# --------------------------------------------------------------------------- 9. one file mode


def test_export_and_checkpoint_files_get_the_same_mode(run, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["pretrain", *FAST, "--steps", "1", "--out", str(out)]) == 0
        assert main(["export", str(out), "--out", str(tmp_path / "m.safetensors")]) == 0
        assert main(["export", str(out), "--format", "timm", "--out", str(tmp_path / "vit.pth")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (out / "checkpoint-0000001.pt", tmp_path / "m.safetensors", tmp_path / "vit.pth")}
    assert set(modes.values()) == {0o644}, modes


# --------------------------------------------------------------------------- 10. the README and docs/ run

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # the guide, and the reports in docs/reports/


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_documentation_python_examples_run(tmp_path, monkeypatch, capsys):
    """Every Python block of README.md and docs/ runs (those that import timm, not a dependency, excepted)."""
    blocks = [(page.relative_to(ROOT), block) for page in DOCS for block in python_blocks(page.read_text())]
    runnable = [(page, b) for page, b in blocks if "import timm" not in b]
    assert any("gmae.load" in b for _, b in runnable) and any("rasterize(" in b for _, b in runnable)
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", *FAST, "--steps", "1", "--out", "runs/pretrain"]) == 0
    Image.new("RGB", (50, 40), (200, 30, 30)).save("photo.jpg")
    for page, block in runnable:
        namespace: dict = {}
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102  our own documentation
        if "rasterize(" in block:
            assert tuple(namespace["image"].shape) == (1, 3, 32, 32)


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces to hyphens), and the
    explicit ``<a id="...">`` ones."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    anchors = set(re.findall(r'<a id="([^"]+)">', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


def test_every_relative_link_of_the_docs_resolves():
    """Every relative markdown link in README.md and docs/ (the guide and the reports) names a file or folder that
    exists, and a link into a page's heading names a heading that page has."""
    checked, broken = 0, []
    for page in DOCS:
        for target in re.findall(r"\]\(([^()\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            checked += 1
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert checked >= 100 and not broken, "\n".join(broken)


def test_the_link_check_can_fail(tmp_path):
    page = "# Title: one\n\n## The `gmae bench` run\n\n```bash\n# not a heading\n```\n"
    assert heading_anchors(page) == {"title-one", "the-gmae-bench-run"}


README_WORDS = 1200  # a five-minute read


def test_readme_is_a_five_minute_guide():
    """The README stays within README_WORDS words, counted as whitespace-separated words of the whole file, code
    blocks and tables included; what it leaves out is linked from it (docs/install.md, docs/status.md)."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.split()) <= README_WORDS, len(readme.split())
    for part in ("## Install", "## Quick start", "## Commands", "## What works and what does not yet",
                 "(docs/install.md)", "(docs/status.md)"):
        assert part in readme, part


def test_readme_installs_torch_and_torchvision_as_a_pair_before_gmae():
    """The install the README gives pins torch and torchvision together, in the same command, before gmae itself
    (so no extra can pull another torch over them), names the error a mismatched pair gives, and pins the pair
    this suite runs with."""
    from importlib.metadata import version

    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("\n## ", readme.index("## Install") + 1)]
    commands = bash_commands(install)
    first_gmae = next(i for i, c in enumerate(commands) if "pip install -e" in c)
    pairs = [c for c in commands[:first_gmae] if "torch==" in c]
    assert pairs and all("torchvision==" in c for c in pairs), commands
    tested = f"torch=={version('torch').split('+')[0]} torchvision=={version('torchvision').split('+')[0]}"
    assert all(tested in c for c in pairs), (tested, pairs)
    assert "operator torchvision::nms does not exist" in install and "import_timm()" in install


def test_readme_gives_the_test_command_ci_runs():
    command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and command in (ROOT / "README.md").read_text().splitlines()


def bash_commands(markdown: str) -> list[str]:
    """The commands of the bash blocks, with continuation lines joined and comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("#")[0].strip() for line in joined.splitlines() if line.split("#")[0].strip()]
    return commands


def test_documented_commands_parse():
    """Every concrete `gmae` command of README.md and docs/ (not the synopses with [options] or IMAGE...) is one
    that gmae's parser accepts."""
    from gmae.cli import parse_args

    checked = 0
    for page in DOCS:
        for command in bash_commands(page.read_text()):
            words = command.split()
            if "gmae" not in words and not words[0].endswith("/gmae") or any(c in command for c in "[{|") \
                    or "..." in command:
                continue
            if words[0].startswith("python") and words[1:2] != ["-m"]:
                continue  # a script's command line (e.g. `python experiments/probes/x.py --encoders gmae`), not gmae's
            start = words.index("gmae") + 1 if "gmae" in words else 1
            parse_args(words[start:])
            checked += 1
    assert checked >= 20


def test_imagenet_commands_agree_and_follow_maes_recipe():
    """Every ImageNet command of README.md and docs/ parses, and all run MAE's recipe: effective batch 4096, blr
    1.5e-4, ImageNet normalisation, 40 warm-up epochs, 400 epochs (1,281,167 images / 4096 = 312.8 steps an
    epoch), given in steps or in epochs (--epochs, or a recipe's)."""
    from gmae.cli import parse_args
    from gmae.cli.pretrain import configs_from_args

    epoch = 1_281_167 / 4096
    found = {}
    for page in DOCS:
        for command in bash_commands(page.read_text()):
            if "/data/imagenet" in command:
                words = command.split()
                args = parse_args(words[words.index("gmae") + 1:])
                args = args.job_args if args.command == "submit" else args  # the command gmae submit runs
                if args.command != "pretrain":  # fine-tuning and probing commands follow their own recipes
                    continue
                tcfg = configs_from_args(args)[1]
                epochs = tcfg.epochs or round(tcfg.steps / epoch)
                warmup = tcfg.warmup_epochs or round(tcfg.warmup_steps / epoch)
                found[f"{page.name}: {command}"] = (args.preset, args.batch_size, args.blr, args.input_norm, warmup,
                                                    epochs)
    assert len(found) >= 4, found  # one GPU (steps and a recipe), one machine of 8, two machines
    assert set(found.values()) == {("base", 4096, 1.5e-4, "imagenet", 40, 400)}, found
    assert round(40 * epoch, -2) == 12500 and round(400 * epoch, -3) == 125000


def test_quick_start_timing_is_measured_on_a_named_machine():
    """The quick start's time and speed come from the machine they were measured on and say that the first step
    compiles; docs/performance.md gives the same figures and the line of `gmae pretrain` that printed the speed."""
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start"):readme.index("\n## ", readme.index("## Quick start") + 1)]
    for text in (quick, (ROOT / "docs" / "performance.md").read_text()):
        assert "3.28 steps/s" in text and "6 minutes" in text and "2-core CPU machine" in text, text
        assert "compil" in text
    assert "done: 1200 steps at 3.28 steps/s" in (ROOT / "docs" / "performance.md").read_text()
    assert "6.8 steps/s" not in quick  # the earlier default's speed is history, in docs/performance.md only


# --------------------------------------------------------------------------- the Python API


def test_load_gives_a_model_with_the_readouts(run, photos):
    import gmae

    model = gmae.load(run)
    assert model.step == 2 and model.config.num_gaussians == 32 and "k=32" in repr(model)
    images = model.images(photos)  # a folder: its two images
    assert tuple(images.shape) == (2, 3, 32, 32)
    assert tuple(model.layers(images, 4).shape) == (2, 4, 3, 32, 32)
    edges, figure = model.edges(images[0]), model.figure_ground(images)
    assert tuple(edges.shape) == (1, 32, 32) and 0 <= edges.min() <= edges.max() <= 1
    assert figure.dtype == torch.bool and tuple(figure.shape) == (2, 32, 32)
    assert tuple(model.features(images).shape) == (2, model.config.embed_dim)
    out = model.reconstruct(images)
    assert tuple(out.image.shape) == (2, 3, 32, 32) and out.mask.float().mean() == model.config.mask_ratio == 0.25
    assert model.gaussians(images).num == 32
    from gmae.errors import GMAEError

    with pytest.raises(GMAEError, match="images must be"):
        model.layers(torch.zeros(3, 16, 16))


# --------------------------------------------------------------------------- figures


def test_readout_figures_say_what_they_show():
    from gmae.readouts.edges import edges_figure
    from gmae.readouts.gaussians import gaussians_figure
    from gmae.readouts.layers import layers_figure
    from gmae.readouts.segment import segment_figure

    img = torch.rand(3, 16, 16)
    fig = layers_figure(img, [4, 8], torch.rand(2, 3, 16, 16), torch.rand(4, 3, 16, 16))
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 1 + 2 + 4 and titles.count("input") == 1  # no empty panel, one input
    assert titles[1:3] == ["K = 4 nearest", "all 8"] and titles[3] == "layer 1 (nearest)"
    assert titles[-1] == "layer 4 (farthest)" and "nearest" in fig.subfigs[0]._suptitle.get_text()
    edges = edges_figure(img, {32: torch.zeros(16, 16, dtype=torch.bool)}, torch.zeros(16, 16))
    assert [ax.get_title() for ax in edges.axes] == ["input", "32 layers", "soft: mean of all"]
    segment = segment_figure(img, torch.ones(16, 16, dtype=torch.bool), img)
    legend = [t.get_text() for t in segment.legends[0].get_texts()]
    assert legend == ["figure (tinted)", "ground (dimmed)"] and "100% of the image" in segment.axes[2].get_title()
    means = torch.rand(10, 3) * 2 - 1
    flat = gaussians_figure(img, means, torch.full((10,), 0.99), img, colors=torch.rand(10, 3))
    assert len(flat.axes) == 3 and "all opacities" in flat.axes[1].get_xlabel()  # no colour bar that shows nothing
    spread = gaussians_figure(img, means, torch.linspace(0, 1, 10), img)
    assert len(spread.axes) == 4 and spread.axes[3].get_ylabel().startswith("opacity")


# --------------------------------------------------------------------------- gmae plot, --tensorboard


def write_metrics(folder: Path, losses, **extra) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": loss, "lr": 1e-3, "step_time": 0.1, **{k: v[s] for k, v in extra.items()}})
             for s, loss in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "lo')  # and a torn last line
    return folder


def test_plot_draws_every_run_on_shared_axes(tmp_path, capsys):
    from gmae.viz.plot import curves_figure

    gmae_run = write_metrics(tmp_path / "gmae", [0.3, 0.2, 0.1], opacity_mean=[0.5, 0.6, 0.7])
    mae_run = write_metrics(tmp_path / "mae", [0.4, 0.3])
    fig = curves_figure([gmae_run, mae_run], smooth=1)
    assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "lr", "opacity_mean"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["gmae", "mae"]
    assert list(fig.axes[0].get_lines()[1].get_ydata()) == [0.4, 0.3]
    assert [line.get_label() for line in fig.axes[2].get_lines()] == ["gmae"]
    out = tmp_path / "curves.png"
    assert main(["plot", str(gmae_run), str(mae_run / "metrics.jsonl"), "--out", str(out)]) == 0
    assert Image.open(out).size[1] > 300
    assert main(["plot", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    one_line_error(capsys, "has no metrics.jsonl")


def test_tensorboard_logs_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["pretrain", *FAST, "--steps", "2", "--out", str(out), "--tensorboard"]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    expected = [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert [s for s, _ in logged] == [0, 1] and np.allclose([v for _, v in logged], [v for _, v in expected])


def test_tensorboard_missing_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    assert main(["pretrain", *FAST, "--steps", "1", "--out", str(tmp_path / "run"), "--tensorboard"]) == 2
    one_line_error(capsys, "pip install 'gmae[tensorboard]'")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- progress


def test_eval_zeroshot_and_ablate_show_progress(run, tmp_path, capsys):
    from gmae.evaluate import ablate
    from gmae.io.loader import load
    from gmae.evaluate.zeroshot import evaluate_zeroshot

    evaluate_zeroshot(load(run, "model")[0], "deadleaves", num_images=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "zero-shot readouts" in err and "2/2" in err
    assert all(f"edges of {name} vs truth" in err for name in ("gmae", "sobel", "canny"))
    ablate.run_ablation(tmp_path / "ablate", names=["k64"], steps=1, evaluate=False, progress=True)
    captured = capsys.readouterr()
    assert "ablate" in captured.err and "1/1" in captured.err and "k64: done in" in captured.err + captured.out


# --------------------------------------------------------------------------- probe --baseline


def test_probe_baseline_prints_random_init_beside_the_trained_weights(run, tmp_path, capsys):
    data = tmp_path / "labelled"
    for split, n in (("train", 4), ("val", 2)):
        for c, level in (("dark", 40), ("light", 210)):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (level, level - 20 * i, level)).save(data / split / c / f"{i}.png")
    args = ["probe", "--checkpoint", str(run), "--data", str(data), "--epochs", "2", "--json"]
    assert main([*args, "--baseline"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert main([*args, "--random-init"]) == 0
    init = json.loads(capsys.readouterr().out)
    assert both["baseline"] == {"linear_acc": init["linear_acc"], "knn_acc": init["knn_acc"]}
    assert both["random_init"] is False
    assert main(args[:-1] + ["--baseline"]) == 0
    table = capsys.readouterr().out
    assert "pre-trained" in table and "random init" in table and table.count("%") == 4


# --------------------------------------------------------------------------- --resume refuses what it would ignore


def test_resume_refuses_flags_that_contradict_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    given = ["-k", "64", "--blr", "1e-3", "--mask-ratio", "0.5", "--preset", "small", "--seed", "0"]
    assert main(["pretrain", *FAST, "--steps", "3", "--out", str(out), "--resume", *given]) == 2
    err = one_line_error(capsys, "--num-gaussians/-k (saved 32, given 64)", "--blr (saved 0.016, given 0.001)",
                         "--mask-ratio (saved 0.25, given 0.5)", "--preset (saved tiny, given small)")
    assert "--seed" not in err and "--steps" not in err  # the saved value given again; a flag a resume may change
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # What a resume may change, and the saved settings given again, are fine; so is --resume=auto on a new folder.
    assert main(["pretrain", *FAST, "--out", str(out), "--resume", "--steps", "3", "--checkpoint-every", "1",
                 "--num-workers", "0", "--seed", "0", "--preset", "tiny"]) == 0
    assert steps_of(out) == [0, 1, 2]
    assert main(["pretrain", *FAST, "--steps", "1", "--out", str(tmp_path / "new"), "--resume=auto", "--blr", "1e-3"]) == 0


def test_finetune_resume_refuses_flags_that_contradict_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(run), "--data", "digits", "--batch-size", "8", "--quiet", "--out", str(out)]
    assert main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--out", str(out), "--resume", "--steps", "2", "--blr", "0.1", "--batch-size", "16",
                 "--layer-decay", "0.75"]) == 2
    err = one_line_error(capsys, "--blr (saved 0.008, given 0.1)", "--batch-size (saved 8, given 16)")
    assert "--layer-decay" not in err and "--steps" not in err
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000001.pt"]
    assert main([*args, "--resume", "--steps", "2"]) == 0  # the same settings given again; --steps extends the run
    assert steps_of(out) == [0, 1]


def test_resume_help_lists_the_flags_a_resume_may_change(capsys):
    for command in ("pretrain", "finetune"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps after a hyphen
        start = text.index("a resume may change")
        allowed = text[start:text.index("--out", start)]
        assert all(flag in allowed for flag in ("--steps", "--checkpoint-every", "--num-workers", "--threads",
                                                "--quiet")), text


# --------------------------------------------------------------------------- gmae plot writes what it prints


def test_plot_prints_the_file_it_writes(tmp_path, capsys):
    run = write_metrics(tmp_path / "run", [0.3, 0.2, 0.1])
    older = tmp_path / "curves.png"
    assert main(["plot", str(run), "--out", str(tmp_path / "curves")]) == 0  # no extension: .png is added
    printed = Path(capsys.readouterr().out.strip())
    assert printed == older and Image.open(printed).format == "PNG" and not (tmp_path / "curves").exists()
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.pdf")]) == 0  # a format matplotlib knows
    assert capsys.readouterr().out.strip() == str(tmp_path / "curves.pdf")
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")
    before = sorted(os.listdir(tmp_path))
    assert main(["plot", str(run), "--out", str(tmp_path / "curves.v2")]) == 2  # one it does not: refused
    one_line_error(capsys, "curves.v2", ".png")
    assert sorted(os.listdir(tmp_path)) == before


# --------------------------------------------------------------------------- eval-zeroshot


def test_eval_zeroshot_of_an_mae_checkpoint_fails_before_any_work(tmp_path, monkeypatch, capsys):
    mae = tmp_path / "mae"
    assert main(["pretrain", *FAST, "--model", "mae", "--steps", "1", "--out", str(mae)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("gmae.evaluate.zeroshot.items", lambda *a, **k: pytest.fail("read the data of an MAE"))
    assert main(["eval-zeroshot", "--checkpoint", str(mae), "--num-images", "2"]) == 2
    err = one_line_error(capsys, "need a GMAE checkpoint")
    assert "0/2" not in err and "%|" not in err  # no progress bar was started


def test_eval_zeroshot_scores_the_trivial_baselines(run, capsys):
    from gmae.evaluate.zeroshot import items

    assert main(["eval-zeroshot", "--checkpoint", str(run), "--num-images", "2", "--json"]) == 0
    baselines = json.loads(capsys.readouterr().out)["baselines"]
    assert {"sobel", "canny", "ellipse", "border prior"} <= set(baselines)  # the existing keys stay
    # everything is figure: its IoU is the share of figure pixels in the truth
    figure_share = np.mean([item.figure.mean() for item in items("deadleaves", 32, 2)[0]])
    assert baselines["all figure"] == {"fg_iou": pytest.approx(figure_share)}
    # an all-zero edge map, scored by the same BSDS scorer
    assert baselines["no edges"] == {"edge_ods": 0.0, "edge_ois": 0.0, "edge_ap": 0.0}
    # a depth order drawn at random: the expected scores
    assert baselines["random order"] == {"depth_rank_spearman": 0.0, "depth_pair_acc": 0.5,
                                         "depth_pair_acc_touching": 0.5, "depth_ooa": 0.5}
    assert main(["eval-zeroshot", "--checkpoint", str(run), "--num-images", "2"]) == 0
    rows = {line.split("  ")[0] for line in capsys.readouterr().out.splitlines()}
    assert {"all figure", "no edges", "random order"} <= rows


def test_documented_choice_lists_match_the_parser():
    """Every `--flag {a,b,c}` of README.md and docs/ lists exactly the choices gmae's parser has for that flag
    (on some command that has it), so that the docs cannot offer a value the command refuses, or hide one."""
    from gmae.cli import build_parser

    choices: dict[str, list[set]] = {}
    for command in build_parser().commands.values():
        for action in command._actions:
            for flag in action.option_strings:
                if action.choices is not None:
                    choices.setdefault(flag, []).append({str(c) for c in action.choices})
    found = 0
    for page in DOCS:
        for flag, listed in re.findall(r"(--[a-z][a-z-]*) \{([A-Za-z0-9_.,-]+)\}", page.read_text()):
            found += 1
            assert flag in choices, f"{page.name}: {flag} takes no choices in any gmae command"
            assert set(listed.split(",")) in choices[flag], \
                f"{page.name}: {flag} {{{listed}}}; the parser offers {[sorted(c) for c in choices[flag]]}"
    assert found >= 10  # the docs do list choices this way
