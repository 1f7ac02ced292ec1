"""The package's import graph, read with `ast`: layers that are only walked down, no cycles, no private
names taken across packages, one import style.

Every ``import`` statement counts, the ones inside functions too (a cycle hidden
in a function-local import is still a cycle). Nothing is imported to read it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gmae"

# Low to high. A module imports modules of lower layers, and of its own layer only inside its own package
# (top-level modules are the package gmae): so the training loop and the evaluations, say, never import
# each other, and what they share lives below them. A name covers a module and everything below it
# (render covers gmae.render.cpu); the longest name that matches decides.
LAYERS = [
    # the one error type
    ("errors",),
    # foundation, torch-free: what the command line reads before anything heavy (the io and runtime folders'
    # own __init__ files are docstrings)
    ("config", "io", "io.files", "runtime", "runtime.threads", "runtime.stopping", "runtime.cluster"),
    # primitives: rendering, data, the loss, processes, logs and curves
    ("model.loss", "render", "data", "runtime.distributed", "viz", "viz.board", "viz.plot", "evaluate.boundaries",
     "evaluate.depth"),
    # models, and the EMA of their weights
    ("model", "model.ema"),
    # model files (checkpoints, exports) and figures
    ("io.checkpoint", "io.export", "io.loader", "viz.figures"),
    # run folders and the zero-shot readouts
    ("io.runs", "readouts"),
    # the training engine: the one loop under pre-training, fine-tuning and MAE's probe
    ("train.engine",),
    # pre-training and the evaluations
    ("train", "evaluate"),
    # detection transfer, on the evaluations' door to timm and torchvision
    ("evaluate.detection",),
    # what runs them: the ablation grid, the benchmarks, the Python API, the readouts' public facade
    ("evaluate.ablate", "bench", "api", "zeroshot"),
    # the command line
    ("cli",),
    # entry points: python -m gmae, and the package itself
    ("__main__", ""),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imports(module: str):
    """(target module, imported name or None, line, relative?) of every gmae import in `module`."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gmae":
                    yield alias.name, None, node.lineno, False
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(module).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gmae":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                # `from . import rasterize` names a function; `from . import threads` a module
                yield (sub, None, node.lineno, bool(node.level)) if sub in MODULES else \
                    (target, alias.name, node.lineno, bool(node.level))


EDGES = {m: sorted({t for t, _, _, _ in imports(m) if t in MODULES} - {m}) for m in MODULES}


def layer_of(module: str) -> int:
    name = module.removeprefix("gmae").removeprefix(".")
    best = None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if name == prefix or name.startswith(prefix + ".") or (prefix == "" and name == ""):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return best[0]


def test_every_module_has_a_layer_and_imports_only_downward():
    wrong = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
             for m, targets in EDGES.items() for t in targets
             if layer_of(t) > layer_of(m) or (layer_of(t) == layer_of(m) and package_of(t) != package_of(m))]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in EDGES[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_imported_across_packages():
    crossing = [f"{m}:{line} imports {name} from {target}"
                for m in MODULES for target, name, line, _ in imports(m)
                if name and name.startswith("_") and package_of(target if target in MODULES else m) != package_of(m)]
    assert not crossing, "\n".join(crossing)


def test_one_import_style_relative_inside_the_package():
    absolute = sorted({f"{m}:{line} imports {target} absolutely" for m in MODULES
                       for target, _, line, relative in imports(m) if not relative})
    assert not absolute, "\n".join(absolute)


@pytest.mark.parametrize("module", ["gmae.cli", "gmae.readouts", "gmae.io.files", "gmae.config.choices", "gmae.config"])
def test_what_the_command_line_reads_first_is_torch_free(module):
    """The modules imported at the top of the command line (and theirs) import no torch at their top level."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        tree = ast.parse(MODULES[m].read_text())
        for node in tree.body:  # top level only: the commands import what they run inside functions
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not (isinstance(node, ast.ImportFrom) and node.level):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n.split(".")[0] in ("torch", "numba", "numpy") for n in names), f"{m} imports {names}"
        todo += [t for t, _, line, _ in imports(m) if any(
            isinstance(n, (ast.Import, ast.ImportFrom)) and n.lineno == line for n in tree.body)]
        # a module's parent packages are imported with it
        todo += [p for p in (m.rsplit(".", i)[0] for i in range(1, m.count(".") + 1)) if p in MODULES]
