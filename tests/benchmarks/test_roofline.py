"""The roofline model's table in the kernels README is what ``benchmarks/roofline.py`` prints for the current
driver (its tile plan and memory formula), so the README cannot drift from the code."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_readme_holds_the_current_roofline_table():
    out = subprocess.run(
        [sys.executable, "benchmarks/roofline.py"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    ).stdout.strip()
    assert "| 32768 | two-pass | 32768 x 4096 |" in out and "| 32768 | one-pass | 4226 x 151936 |" in out
    readme = (ROOT / "apo_kernels" / "kernels" / "README.md").read_text()
    assert out in readme, "regenerate the table: python benchmarks/roofline.py"
