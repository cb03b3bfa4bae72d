"""The architecture as a test (DESIGN.md section 2): the import direction between the packages, imports at the top
of files, a model file that knows nothing of ONNX or INT8, a decoding loop that imports no backend, one IO
contract, and a docstring on every public function. Read from the source files with `ast`: nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"bard_deploy": ROOT / "bard_deploy", "bard_deploy.converters": ROOT / "converters",
            "bard_deploy.runtimes": ROOT / "runtimes", "bard_deploy.calibration": ROOT / "calibration"}
# Who may import whom. "core" is everything in bard_deploy/ that is not an application module or train/.
ALLOWED = {
    "core": {"core"},
    "runtimes": {"core", "runtimes"},
    "calibration": {"core", "runtimes", "calibration"},
    "train": {"core", "runtimes", "train"},
    "converters": {"core", "runtimes", "calibration", "converters"},
    "app": {"core", "runtimes", "calibration", "train", "converters", "app"},
}
APPS = {"bard_deploy.cli", "bard_deploy.bench", "bard_deploy.bench_step", "bard_deploy.replay", "bard_deploy.serve"}


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if pkg == "bard_deploy" and any((folder / sub) in path.parents for sub in ("converters", "runtimes")):
                continue
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((pkg, *rel)).removesuffix(".__init__")
            out[name] = (path, ast.parse(path.read_text(encoding="utf-8")))
    return out


MODULES = _modules()


def group(module: str) -> str:
    """The architectural group of a first-party module name."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("converters", "runtimes", "calibration", "train"):
        return parts[1]
    return "app" if module in APPS else "core"


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
    return found


def test_every_package_module_is_seen():
    assert {"bard_deploy.model", "bard_deploy.runtimes.decode", "bard_deploy.converters.export",
            "bard_deploy.calibration.gate", "bard_deploy.train.stages", "bard_deploy.cli"} <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_import_direction(module):
    path, tree = MODULES[module]
    mine = group(module)
    bad = [(name, line) for name, line in _imports(tree)
           if name.startswith("bard_deploy") and group(name) not in ALLOWED[mine]]
    assert not bad, f"{path.name} ({mine}) imports {bad[0][0]} ({group(bad[0][0])}) at line {bad[0][1]}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_at_the_top(module):
    """First-party imports inside functions hide cycles (third-party ones may be lazy: tensorrt is optional,
    transformers and matplotlib are slow to import for `bard-deploy --help`)."""
    path, tree = MODULES[module]
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for name, line in _imports(fn):
            assert not name.startswith("bard_deploy"), f"{path.name}:{line} imports {name} inside {fn.name}()"


def test_the_model_knows_nothing_of_onnx_tensorrt_or_quantization():
    for module in ("bard_deploy.model", "bard_deploy.vlm", "bard_deploy.vision"):
        names = [n for n, _ in _imports(MODULES[module][1])]
        assert not [n for n in names if n.split(".")[0] in ("onnx", "onnxruntime", "tensorrt", "onnxscript")
                    or "quantiz" in n], module


def test_the_decoding_loop_imports_no_backend():
    names = [n for n, _ in _imports(MODULES["bard_deploy.runtimes.decode"][1])]
    assert not [n for n in names if "backend" in n or n.split(".")[0] in ("onnxruntime", "tensorrt")]


def test_io_names_are_written_only_in_the_io_contract():
    """A graph tensor name as a string literal outside iospec.py is a second, unchecked copy of the contract."""
    # ("attention_bias" is also an HF config field, so config.py may write it: it is not checked)
    names = ("logits", "inputs_embeds", "deepstack_embeds", "image_embeds")
    for module, (path, tree) in MODULES.items():
        if module == "bard_deploy.iospec":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in names and not node.value.startswith(("past_key_values.", "new_key_values.")), \
                    f"{path.name}:{node.lineno} writes the IO name {node.value!r}"


def _public_defs(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield node.name, node
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                    yield f"{node.name}.{sub.name}", sub


@pytest.mark.parametrize("module", sorted(MODULES))
def test_public_functions_have_docstrings(module):
    path, tree = MODULES[module]
    missing = [name for name, node in _public_defs(tree) if ast.get_docstring(node) is None]
    assert not missing, f"{path.name}: no docstring on {', '.join(missing)}"
