"""The mutation audit (``tests/mutants.py``) covers every equation of SPEC.md and stays in step with
the code; the audit itself is run by hand (README, Tests)."""

import re

import pytest

import mutants


def test_every_mutant_still_finds_its_text_once():
    """A change to the code a mutant edits makes it stale: update the mutant with the code."""
    assert mutants.check_edits(mutants.MUTANTS) == []


def test_every_equation_and_section_of_the_spec_has_a_mutant():
    equations = set(range(3, 12))   # SPEC.md states Eqs. 3 to 11, in sections 1 to 8
    covered = {int(n) for m in mutants.MUTANTS for n in re.findall(r"Eq\. (\d+)", m.spec)}
    assert equations <= covered, f"no mutant for Eq. {sorted(equations - covered)}"
    sections = {int(m.spec.split(",")[0]) for m in mutants.MUTANTS if m.spec[0].isdigit()}
    assert sections == set(range(1, 9))
    parts = {m.spec for m in mutants.MUTANTS if not m.spec[0].isdigit()}
    assert parts == {"bench", "fast path", "input", "results", "runs", "sweep"}
    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids))
    for m in mutants.MUTANTS:
        for test in m.tests:
            assert (mutants.ROOT / test.split("::")[0]).is_file(), f"{m.id}: no {test}"


def test_the_audit_kills_a_mutant_in_a_copy_and_leaves_the_tree_alone():
    mutant = next(m for m in mutants.MUTANTS if m.id == "eq5-tau-multiplies")
    path = mutants.ROOT / mutant.edits[0][0]
    before = path.read_text()
    row = mutants.audit(mutant, timeout=300)
    assert row["result"] == "killed" and row["killed_by"].startswith("tests/test_derive.py::test_edge_softmax")
    assert path.read_text() == before


def test_several_jobs_give_each_mutant_its_row_in_the_order_asked(capsys):
    wanted = ["eq11-sum", "eq5-tau-multiplies", "eq7-left-out"]
    chosen = [next(m for m in mutants.MUTANTS if m.id == i) for i in wanted]
    rows = mutants.audit_all(chosen, timeout=300, jobs=2)
    assert [r["id"] for r in rows] == wanted and {r["result"] for r in rows} == {"killed"}
    assert rows[1]["killed_by"].startswith("tests/test_derive.py::test_edge_softmax")
    with pytest.raises(SystemExit):
        mutants.main(["--jobs", "0"])
    assert "--jobs 0: must be an integer >= 1" in capsys.readouterr().err
