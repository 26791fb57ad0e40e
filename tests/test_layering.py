"""The package's layering, checked over its source: no import circle, and no import from a lower layer to a higher.

Every `import` counts, at module level or inside a function (a lazy import hides a circle, it does not remove it).
`LAYERS` is the one picture of the layering (docs/architecture.md and CONTRIBUTING.md show the same): a module
belongs to the longest prefix listed; it may import its own layer and the layers before it. Within one layer,
imports may go either way, but the module graph must stay acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glm45_train"

LAYERS: list[tuple[str, ...]] = [
    ("glm45_train", "glm45_train.errors"),
    ("glm45_train.config", "glm45_train.formats"),  # file formats, schema: know nothing of models
    ("glm45_train.runtime",),  # processes, Megatron on CPU
    ("glm45_train.model",),  # GLM-4.5 config, build, make-tiny, tokenizer
    ("glm45_train.data",),  # sources -> chat renderer -> packing
    ("glm45_train.convert.mapping",),  # the HF <-> mcore table and transforms
    ("glm45_train.convert.torch_dist",),  # torch_dist layout, writer, reader
    ("glm45_train.convert",),  # tensor sources, hf_to_mcore, mcore_to_hf, load_mcore
    ("glm45_train.convert.precision",),  # the check against transformers
    ("glm45_train.lora",),
    ("glm45_train.hub", "glm45_train.infer", "glm45_train.serve"),  # serve: vLLM on exports, the serving contract
    ("glm45_train.launch",),  # planner, Slurm, rehearse
    ("glm45_train.train",),  # sft
    ("glm45_train.rl",),  # GRPO on top of train
    ("glm45_train.evaluate",),  # eval: prompt sets, RL rewards as scorers, the RL engines on exports
    ("glm45_train.cli",),
]


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from pkg import submodule` resolves to the submodule)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
        graph[module] = {t for t in targets if t and t != module}
    return graph


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int:
    matches = [(len(prefix), index) for index, group in enumerate(layers) for prefix in group
               if module == prefix or module.startswith(prefix + ".")]  # fmt: skip
    assert matches, f"{module} belongs to no layer: add it to LAYERS"
    return max(matches)[1]


def upward_imports(graph: dict[str, set[str]], layers: list[tuple[str, ...]]) -> list[str]:
    return sorted(
        f"{module} (layer {layer_of(module, layers)}) imports {target} (layer {layer_of(target, layers)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target, layers) > layer_of(module, layers)
    )


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_circle_in_the_package():
    assert import_cycles(import_graph(module_names(PACKAGE))) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert upward_imports(import_graph(module_names(PACKAGE)), LAYERS) == []


def test_every_subpackage_opens_with_a_docstring():
    missing = [str(p) for p in PACKAGE.rglob("__init__.py") if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_checker_catches_a_planted_circle_and_an_upward_import(tmp_path):
    """Negative control: a copy of the real package with two planted edges fails both checks, naming them."""
    import shutil

    planted = tmp_path / "glm45_train"
    shutil.copytree(PACKAGE, planted, ignore=shutil.ignore_patterns("__pycache__"))
    with (planted / "model" / "tiny.py").open("a") as f:  # model -> convert: upward
        f.write("\n\ndef _planted():\n    from glm45_train.convert.to_mcore import hf_to_mcore  # noqa\n")
    with (planted / "convert" / "mapping" / "names.py").open("a") as f:  # names -> table -> names: a circle
        f.write("\nfrom glm45_train.convert.mapping import table  # noqa\n")
    with (planted / "convert" / "mapping" / "table.py").open("a") as f:
        f.write("\nfrom glm45_train.convert.mapping.names import global_expert_name  # noqa\n")
    graph = import_graph(module_names(planted))
    assert upward_imports(graph, LAYERS) == [
        "glm45_train.model.tiny (layer 3) imports glm45_train.convert.to_mcore (layer 7)"
    ]
    assert import_cycles(graph) == [["glm45_train.convert.mapping.names", "glm45_train.convert.mapping.table"]]


def test_each_stage_imports_without_the_stages_above_it():
    """At run time too: importing a stage loads no module of a higher layer (parent packages stay light)."""
    import subprocess
    import sys

    probe = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print('\\n'.join(m for m in sys.modules if m.startswith('glm45_train')))"
    )
    for stage in ("glm45_train.formats.hf_io", "glm45_train.model.tiny", "glm45_train.convert.mapping.table"):
        loaded = subprocess.run([sys.executable, "-c", probe, stage], capture_output=True, text=True, check=True)
        parents = {stage.rsplit(".", n)[0] for n in range(stage.count("."))}  # loaded by any import of stage
        above = [m for m in loaded.stdout.split() if m not in parents and layer_of(m, LAYERS) > layer_of(stage, LAYERS)]
        assert above == [], f"importing {stage} loads {above}"
