import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py


def benchmark_module(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not part of the package), loaded from its file."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def grid_module():
    """benchmarks/grid.py as a module, loaded once."""
    return benchmark_module("grid")


@pytest.fixture(scope="session")
def ablation_module():
    """benchmarks/revision_ablation.py as a module, loaded once."""
    return benchmark_module("revision_ablation")
