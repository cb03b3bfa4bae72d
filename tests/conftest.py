import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py


@pytest.fixture(scope="session")
def grid_module():
    """benchmarks/grid.py as a module (it is a script, not part of the package), loaded once from its file."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "grid.py"
    spec = importlib.util.spec_from_file_location("grid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
