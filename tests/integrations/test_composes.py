"""The README's composes-with table is the parity tests' cases (``composes.py``), and covers every adapter option."""

import importlib
import importlib.util

import pytest

from apo_kernels.config import POLICY_LOSSES
from tests.integrations import composes


def test_the_readme_table_is_the_cases_rendering():
    text = composes.README.read_text()
    assert composes.readme_with_table(text) == text, "run: python -m tests.integrations.composes"


@pytest.mark.parametrize("row", composes.ROWS, ids=lambda row: row.option)
def test_every_framework_cell_is_backed_by_parity_cases(row):
    assert (row.trl != "-") == bool(row.trl_cases), "a TRL cell needs TRL cases, TRL cases a TRL cell"
    assert (row.verl != "-") == bool(row.verl_cases or row.verl_group_stage_test), "likewise for verl"
    if row.verl_group_stage_test is not None:
        spec = importlib.util.find_spec("tests.integrations.verl.test_advantage")
        assert spec is not None and f"def {row.verl_group_stage_test}(" in open(spec.origin).read()
    for case in row.trl_cases:
        assert case.test in ("parity", "off_policy_mask", "adaptive_entropy"), case


def test_the_table_names_every_policy_term():
    named = " ".join(row.apo for row in composes.ROWS)
    assert [loss for loss in POLICY_LOSSES if f'"{loss}"' not in named] == []


def test_every_verl_loss_mode_has_a_row():
    pytest.importorskip("verl")
    from apo_kernels.integrations.verl import LOSS_MODES

    tested = {case.ours for case in composes.verl_cases()}
    assert set(LOSS_MODES) == tested


def test_every_trl_loss_type_has_a_case():
    pytest.importorskip("trl")
    config = importlib.import_module("apo_kernels.integrations.trl.config")

    tested = {case.loss_type for case in composes.trl_cases("parity")}
    assert set(config.LOSS_TYPE_AGG_MODES) == tested
