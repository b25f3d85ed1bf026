import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_loop.py"


def test_custom_loop_example_trains():
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses = module.main(steps=2)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
