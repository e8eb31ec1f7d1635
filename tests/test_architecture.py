"""The package's shape: stages import only the stages below them (no circle, nothing upward), no
function is too long to read in one sitting, and the public API is there and documented."""

import ast
import inspect
from pathlib import Path

import masktune

SRC = Path(masktune.__file__).parent
# Lower layers first: a module may import its own layer and the layers below it, never one above.
LAYERS = [("errors", "version"), ("storage", "distributed"), ("data",), ("models",), ("saliency",), ("training",),
          ("masks",), ("evaluation",), ("pipeline",), ("report",), ("cli", "__main__")]
LONGEST_FUNCTION = 60


def module_name(path: Path) -> str:
    parts = ["masktune", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in SRC.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The masktune modules that module ``name`` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("masktune")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.startswith("masktune"):
                for alias in node.names:
                    child = f"{base}.{alias.name}"
                    found.add(child if child in MODULES else base)
    return found - {name}


def layer(name: str) -> int:
    top = name.split(".")[1] if name != "masktune" else "masktune"
    return next((i for i, names in enumerate(LAYERS) if top in names), len(LAYERS))


def test_no_import_runs_upward_and_there_is_no_circle():
    graph = {name: imports(name) for name in MODULES}
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert not upward
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            assert state.get(target) != 1, "import circle: " + " -> ".join(trail + [name, target])
            if target not in state:
                visit(target, trail + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_the_folders_are_the_pipeline_stages():
    folders = sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["data", "evaluation", "masks", "pipeline", "report"]


def test_every_function_reads_in_one_sitting():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long


def test_public_api_names_exist_and_are_documented():
    wanted = {"run_experiment", "RunConfig", "register", "Experiment", "ExperimentData", "get_experiment",
              "make_config", "TrainSettings", "train_erm", "finetune", "masktune_finetune", "compute_masks", "predict",
              "evaluate", "load_mnist", "load_fashion_mnist", "make_biased_mnist", "BiasedMNISTConfig",
              "MaskTuneError", "ConfigError", "DataError"}
    assert wanted <= set(masktune.__all__)
    for name in masktune.__all__:
        value = getattr(masktune, name)
        if callable(value):
            assert inspect.getdoc(value), f"masktune.{name} has no docstring"
