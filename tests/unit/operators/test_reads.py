"""A step reads exactly what its row in the step table says: the operators' reads are checked against
``reads`` when the code is written (this test) and when it runs (:func:`closedloop.operators.base.read`)."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

from closedloop import pipeline


def literal_reads(cls, prefix: str = "closedloop.operators") -> set[str]:
    """The step ids an operator class reads by name: ``self.upstream(context, "x")`` and
    ``read(context, self.task_id, "x")`` anywhere in its methods (its bases' included)."""
    found = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith(prefix):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            position = {"upstream": 1, "read": 2}.get(name)
            if position is not None and len(node.args) > position and isinstance(node.args[position], ast.Constant):
                found.add(node.args[position].value)
    return found


@pytest.mark.parametrize("row", pipeline.STEPS, ids=lambda r: r.id)
def test_an_operator_reads_nothing_its_row_does_not_list(row):
    module, _, name = row.operator.partition(":")
    cls = getattr(importlib.import_module(module), name)
    reads = literal_reads(cls)
    assert {r for r in reads if not pipeline.may_read(row.id, r)} == set()


def test_the_check_sees_a_read_the_row_does_not_list():
    class Sneaky:  # a would-be operator that reads the registry record from training
        def run_step(self, ctx, context):
            return self.upstream(context, "register_candidate")

    assert literal_reads(Sneaky, prefix=__name__) == {"register_candidate"}
    assert not pipeline.may_read("train", "register_candidate")


def test_a_read_outside_the_row_fails_the_task_at_run_time():
    from closedloop.errors import PermanentError
    from closedloop.operators.base import read

    with pytest.raises(PermanentError, match="step 'train' reads the result of 'register_candidate', which its row"):
        read({}, "train", "register_candidate")
    assert pipeline.may_read("approval_2", "approval")  # a quorum's earlier approval: its own row
    assert pipeline.may_read("promote", "approval_2") and pipeline.may_read("label", "admit_incident")
    assert pipeline.row_id("approval_2") == "approval" and pipeline.row_id("merge_simulation") == "merge_simulation"
