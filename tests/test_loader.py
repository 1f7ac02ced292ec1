"""The one loader: every model file gmae reads is read by gmae.io.loader.load, and its answers agree."""

import ast
from pathlib import Path

import pytest
import torch

from gmae.errors import GMAEError
from gmae.io.export import export_checkpoint
from gmae.io.loader import WHAT, load
from gmae.model import ViTEncoder
from conftest import TINY, tiny_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
GMAE = Path(__file__).resolve().parents[1] / "gmae"
#: The calls that read a model file: torch's pickle reader and safetensors' readers.
READERS = {("torch", "load"), ("safetensors.torch", "load_file"), ("safetensors", "safe_open")}


def reader_calls(path: Path) -> list[str]:
    """The calls of `path` to a model-file reader (torch.load, safetensors' load_file / safe_open)."""
    tree = ast.parse(path.read_text())
    imported = {a.asname or a.name: (n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                for a in n.names}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in READERS:
            found.append(f"{path.name}:{node.lineno} {f.value.id}.{f.attr}")
        elif isinstance(f, ast.Name) and imported.get(f.id) in READERS:
            found.append(f"{path.name}:{node.lineno} {f.id}")
    return found


def test_only_the_loader_reads_model_files():
    calls = {p.relative_to(GMAE).as_posix(): reader_calls(p) for p in GMAE.rglob("*.py")}
    assert calls.pop("io/loader.py"), "the loader itself reads with torch.load and safetensors"
    assert not [c for found in calls.values() for c in found]


def test_model_encoder_state_and_export_agree(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run" / "checkpoint-0000001.pt", seed=3)
    model, mcfg, state = load(tmp_path / "run", "model")  # the run folder: its newest checkpoint
    assert (mcfg.embed_dim, state["step"], state["weights"]) == (TINY["embed_dim"], 1, "raw")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    encoder, ecfg = load(ckpt, "encoder")
    assert ecfg.depth == TINY["depth"]
    assert all(torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder.state_dict().items())
    exported, _ = load(export_checkpoint(ckpt, tmp_path / "m.safetensors"), "export")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in exported.state_dict().items())
    # `into`: the file's encoder copied into another of the same shape
    torch.manual_seed(99)
    fresh = ViTEncoder(TINY["img_size"], TINY["patch_size"], 3, TINY["embed_dim"], TINY["depth"], TINY["num_heads"])
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    load(ckpt, "encoder", into=fresh)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in fresh.state_dict().items())


def test_a_checkpoint_is_not_a_fine_tuning_checkpoint_and_an_unknown_what_is_named(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint-0000001.pt")
    assert load(ckpt, "checkpoint")["step"] == 1
    with pytest.raises(GMAEError, match="is not a gmae fine-tune checkpoint"):
        load(ckpt, "finetune-checkpoint")
    with pytest.raises(GMAEError) as e:
        load(ckpt, "weights")
    assert "\n" not in str(e.value) and all(what in str(e.value) for what in WHAT)
