"""The shape of the repository: the paper's stages at the root, one-way imports, collectives in one place."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"train_sft.py", "train_compass.py", "reward.py", "nft.py", "rl_fr.py", "rl_nr.py", "infer.py"}
PACKAGES = ("common", "baselines", "refreward_sr", "realsr_r1", "evaluation", "mini", "scale")


def project_files() -> dict[str, Path]:
    """{dotted module name: file} of the project's code (tests excluded)."""
    files = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        for p in (ROOT / package).rglob("*.py"):
            if p.name != "__init__.py":
                files[".".join(p.relative_to(ROOT).with_suffix("").parts)] = p
    return files


def imported_modules(node: ast.AST, modules: set[str]) -> set[str]:
    """The project modules an import statement names ("from common import backbone" names common.backbone)."""
    found = set()
    if isinstance(node, ast.Import):
        found = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
        found = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def test_the_root_holds_the_paper_stages_and_nothing_else():
    assert {p.name for p in ROOT.glob("*.py")} == STAGES
    for package in PACKAGES:
        assert (ROOT / package / "__init__.py").exists(), package


def test_imports_are_one_way_and_at_module_level():
    files = project_files()
    modules = set(files)
    graph, late = {}, []
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        graph[name] = set().union(*(imported_modules(n, modules) for n in tree.body)) - {name}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if imported_modules(inner, modules):
                        late.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    assert not late, f"function-level imports of project modules: {late}"
    # no cycle: a depth-first search that never meets a module on its own path
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            assert state.get(dep) != "open", "import cycle: " + " -> ".join([*path, module, dep])
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    # the stages stand on the shared plumbing, never the other way round
    for name in graph:
        if name.startswith("common."):
            assert not {d for d in graph[name] if not d.startswith("common.")}, (name, graph[name])


def test_every_collective_goes_through_the_training_helpers():
    """NCCL takes GPU tensors only; common/training.py's helpers put every tensor on the process group's device
    (tests/test_gpu_paths.py checks them under a backend registered for cuda only). A collective called anywhere
    else could pass a CPU tensor: none may exist."""
    collectives = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
                   "reduce", "reduce_scatter", "gather", "scatter", "all_to_all", "send", "recv", "gather_object"}
    helpers = {"all_reduce_sum", "all_reduce_grads", "all_gather", "broadcast_object", "barrier"}
    outside = []
    for name, path in project_files().items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                for call in ast.walk(node):
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr in collectives and isinstance(call.func.value, ast.Name)
                            and call.func.value.id in ("dist", "distributed")
                            and not (name == "common.training" and node.name in helpers)):
                        outside.append(f"{path.relative_to(ROOT)}:{call.lineno} {node.name}")
    assert not outside, f"collectives outside common/training.py's helpers: {outside}"


def test_every_command_in_the_makefile_and_readmes_names_a_file_or_module_that_exists():
    """`python X.py` / `python -m a.b` in the Makefile and the READMEs: the file or module is there (a move that
    forgets a command breaks `make demo` for every new user)."""
    modules = set(project_files())
    texts = [ROOT / "Makefile", ROOT / "README.md", *ROOT.glob("*/README.md")]
    checked = 0
    for path in texts:
        text = path.read_text()
        for module in re.findall(r"(?:python|\$\(PY\)|torchrun[^\n]*?)\s+-m\s+([a-z_]+\.[a-z_.]+)", text):
            assert module in modules, f"{path.name}: python -m {module}"
            checked += 1
        for script in re.findall(r"(?:python|\$\(PY\)|torchrun --nproc_per_node \d+)\s+([a-z_]+\.py)\b", text):
            assert (ROOT / script).exists(), f"{path.name}: {script}"
            checked += 1
    assert checked >= 10
