"""The house: every module imports on its own, no import circles, arrows point down, and paths
stored outside the code (a DAG serialized before the package was reshaped) still resolve."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

SRC = PROJECT / "src"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / "closedloop").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if parts[-1] != "__main__":
            found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """closedloop module → the closedloop modules it imports (module level and inside functions)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_circles():
    graph = import_graph()
    assert len(graph) > 60  # the walk found the package
    assert cycles(graph) == []
    # the check sees a circle when there is one
    assert cycles({**graph, "closedloop.vocab": {"closedloop.runtime.tracking"}}) != []


@pytest.mark.parametrize(("layer", "may_not_import"), [
    ("closedloop.runtime", ("closedloop.steps", "closedloop.operators", "closedloop.records", "closedloop.cli",
                            "closedloop.web", "closedloop.local", "closedloop.dagbuilder", "closedloop.hooks")),
    ("closedloop.steps", ("closedloop.operators", "closedloop.records", "closedloop.cli", "closedloop.web",
                          "closedloop.local", "closedloop.dagbuilder", "closedloop.hooks")),
    ("closedloop.records", ("closedloop.cli", "closedloop.web", "closedloop.local", "closedloop.operators")),
    ("closedloop.spec", ("closedloop.steps", "closedloop.operators", "closedloop.records", "closedloop.cli",
                         "closedloop.web", "closedloop.local")),
    ("closedloop.pipeline", ("closedloop.",)),
    ("closedloop.vocab", ("closedloop.",)),
    ("closedloop.operators", ("closedloop.cli", "closedloop.web", "closedloop.local", "closedloop.records")),
    ("closedloop.web", ("closedloop.cli", "closedloop.local")),
])
def test_arrows_point_down(layer, may_not_import):
    bad = {(m, t) for m, targets in import_graph().items() if m == layer or m.startswith(layer + ".")
           for t in targets if t.startswith(may_not_import) and not (t == layer or t.startswith(layer + "."))}
    assert bad == set()


def test_nothing_imports_cli_or_local_but_their_entry_points():
    """The command line is the top: nothing imports it; the local environment (server, demo, local
    run) sits under it, and only the command line imports that. No package-level circle is exempt."""
    graph = import_graph()
    assert {(m, t) for m, targets in graph.items() if not m.startswith("closedloop.cli")
            for t in targets if t.startswith("closedloop.cli")} == set()
    assert {(m, t) for m, targets in graph.items() if not m.startswith(("closedloop.cli", "closedloop.local"))
            for t in targets if t.startswith("closedloop.local")} == set()


def test_no_package_imports_a_package_that_imports_it():
    """Package-level circles (``cli`` ⇄ ``local``): every arrow between two packages runs one way."""
    def package(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2])

    edges = {(package(m), package(t)) for m, targets in import_graph().items() for t in targets
             if package(m) != package(t)}
    assert sorted((a, b) for a, b in edges if (b, a) in edges and a < b) == []


def test_steps_import_no_airflow():
    for name, path in modules().items():
        if name.startswith(("closedloop.steps", "closedloop.runtime")):
            assert "airflow" not in {n.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                                     for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                                               [node.module] if isinstance(node, ast.ImportFrom) and node.module
                                               else [])}, name


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    names = sorted(modules())
    code = ("import importlib, sys, json\nbad = {}\nfor n in json.loads(sys.argv[1]):\n"
            "    try:\n        importlib.import_module(n)\n    except Exception as e:\n"
            "        bad[n] = f'{type(e).__name__}: {e}'\nprint(json.dumps(bad))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names)], capture_output=True, text=True,
                         timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_the_package_top_level_shows_the_architecture():
    top = {p.name for p in (SRC / "closedloop").iterdir() if not p.name.startswith("__")}
    assert top == {"errors.py", "settings.py", "vocab.py", "pipeline.py", "spec", "dagbuilder.py", "operators",
                   "triggers", "hooks", "executors.py", "retry.py", "notifiers.py", "openlineage.py", "podstep.py", "plugin.py",
                   "provider.py", "runtime", "steps", "records", "cli", "web", "local", "driving"}


def test_a_dag_serialized_before_the_reshape_still_loads(airflow_db):
    """Classpaths Airflow stored (operators' modules, the asset watchers' triggers, entry points named
    in templates) resolve after the package was reshaped."""
    from airflow.sdk.module_loading import import_string
    from airflow.serialization.serialized_objects import DagSerialization

    stored = json.loads((PROJECT / "tests" / "fixtures" / "serialized_before_move.json").read_text())
    for dag_id, data in stored.items():
        dag = DagSerialization.from_dict(data)
        assert dag.dag_id == dag_id
        for task in dag.tasks:
            module = data["dag"]["tasks"][[t["__var"]["task_id"] for t in data["dag"]["tasks"]].index(
                task.task_id)]["__var"]["_task_module"]
            import_string(f"{module}.{task.task_type}")  # the operator class is where it was
    text = json.dumps(stored)
    import re

    triggers = set(re.findall(r'"(closedloop\.triggers\.[a-z_]+\.[A-Z][A-Za-z]+)"', text))
    assert triggers == {"closedloop.triggers.incidents.IncidentInboxTrigger",
                        "closedloop.triggers.incidents.KpiWatchTrigger",
                        "closedloop.triggers.registry.AliasWatchTrigger"}
    for path in triggers:
        import_string(path)
    for entry in set(re.findall(r'"(closedloop\.driving\.[a-z_]+:[a-z_]+)"', text)):
        from closedloop.runtime.context import resolve

        assert callable(resolve(entry))
    assert import_string("closedloop.retry.TransientOnlyRetryPolicy")  # the retry policy's classpath
    assert import_string("closedloop.plugin.ClosedLoopPlugin")
    import closedloop.cli.commands  # noqa: F401 - a submodule must not shadow the entry point's function

    entry = import_string("closedloop.cli.main")  # pyproject: closedloop = "closedloop.cli:main"
    assert callable(entry) and entry.__module__ == "closedloop.cli"
    assert import_string("closedloop.provider.get_provider_info")


def test_no_tag_or_name_of_ours_is_written_outside_the_vocabulary():
    """Every ``closedloop.…`` string in the package is a module path (``closedloop.podstep``, an entry point
    ``closedloop.driving.policy:train_policy``) or lives in ``vocab.py``: tags, prefixes and audit events are
    written once. An f-string's literal parts count too (``f"closedloop.request.{k}"`` is a stray)."""
    mods = modules()
    strays = []
    for name, path in mods.items():
        if name == "closedloop.vocab":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            if not text.startswith("closedloop."):
                continue
            module = text.split(":")[0].rstrip(".")
            if module in mods or module.rpartition(".")[0] in mods:  # a module, an entry point or a classpath
                continue
            strays.append(f"{path.relative_to(SRC)}:{node.lineno}: {text!r}")
    assert strays == []
    # the check sees one when there is one
    tree = ast.parse('tags = {"closedloop.review.decision": 1, f"closedloop.request.{1}": 2}')
    found = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and n.value.startswith("closedloop.") and n.value.split(":")[0].rstrip(".") not in mods]
    assert found == ["closedloop.review.decision", "closedloop.request."]


def test_metric_prefixes_are_written_once_in_the_vocabulary():
    """``sim.``, ``offline.``, ``hil.``, ``shift.``, ``online.``: a bare prefix, a ``startswith``/
    ``removeprefix`` on one, or an f-string that builds a metric name from one, lives in ``vocab.py``."""
    prefixes = ("sim.", "offline.", "hil.", "shift.", "online.")

    def strays_in(tree) -> list[int]:
        found = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in prefixes:
                found.append(node.lineno)
            elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                    and str(node.values[0].value).startswith(prefixes):
                found.append(node.lineno)
        return sorted(set(found))

    strays = [f"{path.relative_to(SRC)}:{line}" for name, path in modules().items() if name != "closedloop.vocab"
              for line in strays_in(ast.parse(path.read_text()))]
    assert strays == []
    assert strays_in(ast.parse('x.startswith("sim.")\ny = f"offline.{k}"')) == [1, 2]  # the check sees them
