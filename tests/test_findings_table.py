"""Findings read from a labels table, both public layouts: CheXpert's one column per finding
(uncertain cells by the declared policy) and ChestX-ray14's ``|``-joined findings column; bad
cells refused in one line that quotes none."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest

from tasks.data.findings import from_finding_columns, from_findings_list
from tasks.errors import MedtransferError

NAN = np.nan
CHEXPERT = """Path,Sex,Edema,Pleural Effusion
p1/view1.jpg,F,1.0,
p2/view1.jpg,M,-1.0,0.0
p3/view1.jpg,F,,1.0
p4/view1.jpg,M,0.0,-1.0
"""
CHESTXRAY14 = """Image Index,Finding Labels,Patient ID
a.png,No Finding,1
b.png,Effusion|Mass,1
c.png,Mass,2
d.png,Atelectasis|Effusion,3
"""


def _table(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text))


@pytest.mark.parametrize(("policy", "uncertain"), [("ignore", NAN), ("zeros", 0.0), ("ones", 1.0)])
def test_chexpert_columns_follow_the_uncertain_policy_and_blank_is_absent(policy, uncertain):
    findings = from_finding_columns(
        _table(CHEXPERT), ["Edema", "Pleural Effusion"], policy, "labels.csv"
    )
    assert findings.names == ("Edema", "Pleural Effusion")
    expected = np.array([[1, 0], [uncertain, 0], [0, 1], [0, uncertain]], dtype=np.float32)
    np.testing.assert_array_equal(findings.labels, expected)
    assert findings.uncertain_cells == 2


def test_chestxray14_findings_become_one_column_each_and_no_finding_none():
    findings = from_findings_list(_table(CHESTXRAY14), "Finding Labels", "Data_Entry_2017.csv")
    assert findings.names == ("Atelectasis", "Effusion", "Mass")
    np.testing.assert_array_equal(findings.labels, [[0, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0]])


@pytest.mark.parametrize("cell", ["2", "yes", "0.5", "DOE^JANE"])
def test_a_finding_cell_other_than_1_0_minus1_or_blank_is_one_line_that_quotes_no_cell(cell):
    table = _table(CHEXPERT).astype(object)
    table.loc[2, "Edema"] = cell
    with pytest.raises(MedtransferError) as err:
        from_finding_columns(table, ["Edema", "Pleural Effusion"], "ignore", "labels.csv")
    message = str(err.value)
    assert "'Edema' has 1 cell(s) that are not 1, 0, -1 or blank (first: line 4)" in message
    assert "\n" not in message and repr(cell) not in message and "DOE" not in message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"Finding Labels": "No Finding|Mass"}, "list 'No Finding' beside a finding"),
        ({"Finding Labels": ""}, "have an empty 'Finding Labels' (first: line 3)"),
        ({"Finding Labels": "mass"}, "names the finding 'Mass' also as 'mass'"),
    ],
)
def test_a_contradictory_empty_or_case_variant_findings_cell_is_refused(edit, expected):
    table = _table(CHESTXRAY14).astype(object)
    for column, value in edit.items():
        table.loc[1, column] = value
    with pytest.raises(MedtransferError, match=re.escape(expected)):
        from_findings_list(table, "Finding Labels", "Data_Entry_2017.csv")


def test_an_unknown_policy_or_missing_column_is_refused():
    with pytest.raises(MedtransferError, match=r"data\.uncertain must be one of"):
        from_finding_columns(_table(CHEXPERT), ["Edema"], "maybe", "labels.csv")
    with pytest.raises(MedtransferError, match=r"lacks the finding column\(s\) \['Cardiomegaly'\]"):
        from_finding_columns(_table(CHEXPERT), ["Cardiomegaly"], "ignore", "labels.csv")
