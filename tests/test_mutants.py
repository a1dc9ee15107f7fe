"""The mutation audit (``tests/mutants.py``) is a tool run by hand (README, Tests): these tests check
that it covers every equation and still works, not that every mutant's line is unchanged (the audit
itself reports a mutant whose line was rewritten)."""

import re

import pytest

import mutants


def _current(ids):
    """The mutants of ``ids`` whose text is still in their file (a rewritten line makes one stale)."""
    stale = {problem.split(":")[0] for problem in mutants.check_edits(mutants.MUTANTS)}
    return [m for m in mutants.MUTANTS if m.id in ids and m.id not in stale]


def test_every_equation_and_topic_of_the_method_has_a_mutant():
    equations = set(range(3, 12))   # the paper's Eqs. 3 to 11, in the method's topics 1 to 8
    covered = {int(n) for m in mutants.MUTANTS for n in re.findall(r"Eq\. (\d+)", m.spec)}
    assert equations <= covered, f"no mutant for Eq. {sorted(equations - covered)}"
    sections = {int(m.spec.split(",")[0]) for m in mutants.MUTANTS if m.spec[0].isdigit()}
    assert sections == set(range(1, 9))
    parts = {m.spec for m in mutants.MUTANTS if not m.spec[0].isdigit()}
    assert parts == {"bench", "data-parallel", "fast path", "input", "results", "runs", "sweep"}
    ids = [m.id for m in mutants.MUTANTS]
    assert len(ids) == len(set(ids))
    for m in mutants.MUTANTS:
        for test in m.tests:
            assert (mutants.ROOT / test.split("::")[0]).is_file(), f"{m.id}: no {test}"


def test_a_stale_mutant_is_reported_not_run(tmp_path):
    stale = mutants.Mutant("gone", "2", "a line that was rewritten", (("entrannas/derive.py", "no such line", "x"),),
                           ("tests/test_derive.py",))
    assert mutants.check_edits([stale]) == ["gone: entrannas/derive.py holds its text 0 times, not once: 'no such line'"]


def test_the_audit_kills_a_mutant_in_a_copy_and_leaves_the_tree_alone():
    mutant = _current({"eq5-tau-multiplies"})[0]
    path = mutants.ROOT / mutant.edits[0][0]
    before = path.read_text()
    row = mutants.audit(mutant, timeout=300)
    assert row["result"] == "killed" and row["killed_by"].startswith("tests/test_derive.py::test_edge_softmax")
    assert path.read_text() == before


def test_several_jobs_give_each_mutant_its_row_in_the_order_asked(capsys):
    wanted = ["eq11-sum", "eq5-tau-multiplies", "eq7-left-out"]
    chosen = sorted(_current(set(wanted)), key=lambda m: wanted.index(m.id))
    assert len(chosen) == 3
    rows = mutants.audit_all(chosen, timeout=300, jobs=2)
    assert [r["id"] for r in rows] == wanted and {r["result"] for r in rows} == {"killed"}
    assert rows[1]["killed_by"].startswith("tests/test_derive.py::test_edge_softmax")
    with pytest.raises(SystemExit):
        mutants.main(["--jobs", "0"])
    assert "--jobs 0: must be an integer >= 1" in capsys.readouterr().err
