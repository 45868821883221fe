"""The step table: what is derived from it follows it, a row is checked when it is added, and a test
can add one and have it gone afterwards."""

from __future__ import annotations

import pytest

from closedloop import pipeline
from closedloop.pipeline import Step


def test_derived_tables_follow_the_rows():
    assert pipeline.ORDER == tuple(s.id for s in pipeline.STEPS)
    assert set(pipeline.CACHEABLE) == {s.id for s in pipeline.STEPS if s.cacheable}
    assert pipeline.PLANNED == pipeline.CACHEABLE[1:]
    assert set(pipeline.POD_STEPS) == {"train", "simulate"}
    for row in pipeline.STEPS:  # every edge and read names a row earlier in the table
        assert all(pipeline.ORDER.index(u) < pipeline.ORDER.index(row.id) for u in (*row.upstream, *row.reads)), row.id


def test_a_quorums_tasks_belong_to_the_approval_row():
    assert pipeline.row_id("approval_2") == "approval" and pipeline.row_id("approval") == "approval"
    assert pipeline.row_id("release_gate") == "release_gate"
    assert pipeline.may_read("approval_2", "approval") and pipeline.may_read("promote", "approval")
    assert not pipeline.may_read("train", "release_gate")
    assert pipeline.may_read("train", "admit_incident")  # what started the run: every step may read it


def test_conditional_rows_only_where_the_template_has_their_section():
    plain = [s.id for s in pipeline.steps_of(hil=False, approval=False)]
    assert "approval" not in plain and "merge_simulation" not in plain and "admit_incident" not in plain
    every = [s.id for s in pipeline.steps_of(hil=True, approval=True, incidents=True, shards=True)]
    assert every == list(pipeline.ORDER)


def test_an_added_row_is_everywhere_while_it_is_there_and_checked():
    row = Step("profile", pipeline.GENERIC, doc="d", function="m:f", upstream=("label",), reads=("label",),
               crash_points=pipeline.GENERIC_CRASH_POINTS)
    with pipeline.with_row(row, before="validate_data"):
        assert pipeline.ORDER.index("label") + 1 == pipeline.ORDER.index("profile")
        assert pipeline.step("profile") is row and pipeline.may_read("profile", "label")
        from closedloop.runtime.faults import matrix

        assert matrix()["profile"] == pipeline.GENERIC_CRASH_POINTS
    assert "profile" not in pipeline.BY_ID and "profile" not in pipeline.ORDER
    with pytest.raises(ValueError, match="needs a 'function'"):
        with pipeline.with_row(Step("x", pipeline.GENERIC, doc="d")):
            pass
    with pytest.raises(ValueError, match="does not have: \\['nowhere'\\]"):
        with pipeline.with_row(Step("x", pipeline.GENERIC, doc="d", function="m:f", reads=("nowhere",))):
            pass
    with pytest.raises(ValueError, match="unique"):
        with pipeline.with_row(Step("train", pipeline.GENERIC, doc="d", function="m:f")):
            pass
    assert pipeline.STEPS[-1].id == "promote"  # a refused row leaves the table as it was
