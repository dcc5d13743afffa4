"""The package's layers: every module imports only modules below it, lazy imports inside functions included.

core (settings, the stage registry, model shapes, model, data, the DeepSpeed config reader) -> run (the
pre-flight checks, the Trainer subclass and its callbacks, metrics, train) -> tools (the commands on top).
Within a layer a module imports only modules listed before it, so there is no import cycle.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workshop"

LAYERS = {
    "core": ["errors", "files", "units", "distributed", "stages", "builtin_data", "shapes", "ds_config", "config",
             "hub", "data_loader", "model"],
    "run": ["memory", "preflight", "metrics", "ds_grad_clip", "evaluation", "trainer", "train"],
    "tools": ["estimate", "plots", "report", "prefetch", "runner", "bench", "scale", "doctor", "cli", "__main__"],
}
ORDER = {name: (layer, i) for layer, (_, names) in enumerate(LAYERS.items()) for i, name in enumerate(names)}


def imported_modules(path: Path) -> set[str]:
    """The workshop modules a file imports anywhere in it: at the top, in functions, under conditions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("workshop.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "workshop":  # from workshop import config, model as models
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("workshop."):
                found.add(node.module.split(".")[1])
    return found - {"__init__"}


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert sorted(modules - set(ORDER)) == [], "add the new module to LAYERS, in the layer it belongs to"


def test_each_module_imports_only_modules_below_it():
    wrong = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "__init__":
            continue
        for name in sorted(imported_modules(path)):
            if name not in ORDER or path.stem not in ORDER or ORDER[name] >= ORDER[path.stem]:
                wrong.append(f"{path.stem} imports {name}")
    assert wrong == []
