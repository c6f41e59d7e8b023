"""The package's imports run one way (the layout shows the architecture; torchtitan's rule that the model knows
nothing of how it is parallelised): cli -> train -> parallel -> models, with data beside models and ckpt_tools on top
of everything. Read from the source with ``ast``, so a local import inside a function counts too."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each module's layer; a module may import its own layer or lower ones, never a higher one. models and data sit in
# one layer but must not import each other.
LAYERS = [
    ("mindspore_llm.common",),
    ("mindspore_llm.config_utils", "mindspore_llm.fileio"),
    ("mindspore_llm.checkpoint", "mindspore_llm.tokenizer", "mindspore_llm.quant"),
    ("mindspore_llm.models", "mindspore_llm.data"),
    ("mindspore_llm.lora", "mindspore_llm.peft", "mindspore_llm.distill", "mindspore_llm.flops",
     "mindspore_llm.generation", "mindspore_llm.rl"),
    ("mindspore_llm.parallel",),
    ("mindspore_llm.train",),
    ("mindspore_llm.cli",),
    ("ckpt_tools",),
]
SIBLINGS_APART = [("mindspore_llm.models", "mindspore_llm.data")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> tuple[int, str]:
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return level, prefix
    raise AssertionError(f"{module} is in no layer of tests/test_import_layers.py: give it one")


def imports_of(path: Path, module: str, modules) -> set[str]:
    """The project modules that `path` (module `module`) imports: ``from pkg import name`` counts as pkg.name when
    that is a module, else as pkg."""
    found = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("mindspore_llm", "ckpt_tools")} - {module}


def project_modules() -> dict[str, Path]:
    files = sorted((ROOT / "mindspore_llm").rglob("*.py")) + sorted((ROOT / "ckpt_tools").rglob("*.py"))
    return {module_name(f): f for f in files}


MODULES = project_modules()


def resolved_imports(module: str) -> set[str]:
    return imports_of(MODULES[module], module, MODULES)


@pytest.mark.parametrize("module", [m for m in MODULES if m != "mindspore_llm"])
def test_no_upward_import(module):
    level, own = layer_of(module)
    for imported in sorted(resolved_imports(module)):
        if imported == "mindspore_llm":  # the package's own __init__ (its public names)
            continue
        imported_level, imported_prefix = layer_of(imported)
        assert imported_level <= level, (f"{module} (layer {own}) imports {imported} (layer {imported_prefix}), "
                                         f"which sits above it")
        for a, b in SIBLINGS_APART:
            assert {own, imported_prefix} != {a, b}, f"{module} imports {imported}: {a} and {b} stay apart"


def test_no_import_cycle():
    graph = {m: resolved_imports(m) - {"mindspore_llm"} for m in MODULES if m != "mindspore_llm"}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1  # on the current path
        for imported in sorted(graph.get(node, ())):
            if state.get(imported) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(imported):] + [imported]))
            if imported not in state:
                visit(imported, trail + [imported])
        state[node] = 2  # done

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_checks_see_a_violation(tmp_path):
    """The walker itself: an upward import in a stand-in source is found."""
    source = tmp_path / "layers.py"
    source.write_text("def f():\n    from mindspore_llm.parallel.plan import apply_plan\n")
    assert "mindspore_llm.parallel.plan" in imports_of(source, "mindspore_llm.models.layers", MODULES)
    assert layer_of("mindspore_llm.parallel.plan")[0] > layer_of("mindspore_llm.models.layers")[0]
