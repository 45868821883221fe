"""What ``closedloop pipelines validate`` checks beyond one template's schema: the folder it joins
and the deployment it runs in — before any compute.

- pipeline and model names already used by another template of the folder (also when one file is
  validated);
- entry points that do not import (each in a bounded subprocess: a company's module may be slow or
  broken, never this process);
- people the deployment does not know (approvers, rollback, incident reporters, the HIL rig),
  checked against the auth manager's users when they can be read here, else a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from closedloop.spec.schema import LoadedSpec, load_spec, template_files

ENTRY_POINT_TIMEOUT_S = 60


def folder_problems(loaded: LoadedSpec) -> list[str]:
    """Names and models of ``loaded`` that another template in its folder already has."""
    problems = []
    for other in template_files(loaded.path.parent):
        if other.resolve() == loaded.path.resolve():
            continue
        try:
            them = load_spec(other)
        except Exception:  # that file's own errors are its own
            continue
        if them.spec.name == loaded.spec.name:
            problems.append(f"{loaded.path}: name: pipeline name {loaded.spec.name!r} is already used by {other}")
        if them.spec.model.name == loaded.spec.model.name:
            problems.append(f"{loaded.path}: model.name: registered model {loaded.spec.model.name!r} is already "
                            f"produced by {other}; two pipelines writing one model would overwrite each other's "
                            "candidate")
    return problems


def entry_points(loaded: LoadedSpec) -> dict[str, str]:
    """Field path → entry point, for every entry point a template names."""
    s = loaded.spec
    return {"dataset.generator": s.dataset.generator, "label_policy.entry_point": s.label_policy.entry_point,
            "training.entry_point": s.training.entry_point, "simulation.entry_point": s.simulation.entry_point,
            "simulation.summarize": s.simulation.summarize}


_IMPORT = """
import importlib, json, sys
out = {}
for ep in json.loads(sys.argv[1]):
    module, _, name = ep.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        out[ep] = None if callable(fn) else f"{name!r} in {module} is not callable"
    except AttributeError:
        out[ep] = f"module {module} has no {name!r}"
    except BaseException as exc:
        out[ep] = f"importing {module} failed: {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def entry_point_problems(specs: list[LoadedSpec], timeout: float = ENTRY_POINT_TIMEOUT_S) -> list[str]:
    """Every entry point imported once, in one subprocess bounded by ``timeout`` seconds."""
    where: dict[str, list[str]] = {}
    for loaded in specs:
        for field, ep in entry_points(loaded).items():
            where.setdefault(ep, []).append(f"{loaded.path}: {field}")
    if not where:
        return []
    try:
        out = subprocess.run([sys.executable, "-c", _IMPORT, json.dumps(sorted(where))], capture_output=True,
                             text=True, timeout=timeout, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    except subprocess.TimeoutExpired:
        return [f"entry points {', '.join(sorted(where))}: importing them took over {timeout:g} s"]
    try:
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return [f"entry points: the import check failed: {out.stderr.strip()[-500:]}"]
    return [f"{at}: entry point {ep!r}: {why}" for ep, why in sorted(found.items()) if why for at in where[ep]]


def people(loaded: LoadedSpec) -> dict[str, list[str]]:
    """Field path → the Airflow users a template names."""
    s = loaded.spec
    out: dict[str, list[str]] = {}
    if s.approval is not None:
        out["approval.approvers"] = list(s.approval.approvers)
        if s.approval.rollback:
            out["approval.rollback"] = list(s.approval.rollback)
    if s.incidents is not None and s.incidents.reporters:
        out["incidents.reporters"] = list(s.incidents.reporters)
    if s.hil is not None:
        out["hil.reporter"] = [s.hil.reporter]
    return out


def known_users() -> tuple[set[str] | None, str]:
    """The users the deployment's auth manager knows, when they can be read here (SimpleAuthManager's
    configured users), and where from; None with the reason otherwise."""
    try:
        from airflow.configuration import conf

        manager = conf.get("core", "auth_manager", fallback="") or ""
        users = conf.get("core", "simple_auth_manager_users", fallback="") or ""
    except Exception as exc:  # no Airflow configuration here
        return None, f"Airflow's configuration cannot be read ({type(exc).__name__})"
    if manager and not manager.endswith("SimpleAuthManager"):
        return None, f"the auth manager {manager.rsplit('.', 1)[-1]} keeps its users elsewhere"
    if os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS") is None and not _configured(users):
        return None, "no [core] simple_auth_manager_users is configured here"
    return {u.split(":")[0].strip() for u in users.split(",") if u.strip()}, "[core] simple_auth_manager_users"


def _configured(users: str) -> bool:
    return bool(users.strip()) and users.strip() != "admin:admin"


def people_problems(specs: list[LoadedSpec]) -> tuple[list[str], list[str]]:
    """(errors, warnings): people the deployment does not know; a warning when it cannot tell."""
    users, source = known_users()
    named = [(loaded, field, who) for loaded in specs for field, names in people(loaded).items() for who in names]
    if not named:
        return [], []
    if users is None:
        return [], [f"cannot check the people the templates name ({source}); check that "
                    + ", ".join(sorted({w for _, _, w in named})) + " exist in your auth manager"]
    return [f"{loaded.path}: {field}: {who!r} is not a user of this deployment ({source}: "
            f"{', '.join(sorted(users))})" for loaded, field, who in named if who not in users], []


def deployment_check(specs: list[LoadedSpec], *, one_file: bool) -> tuple[list[str], list[str]]:
    """(errors, warnings) of valid templates against their folder and the deployment."""
    errors: list[str] = []
    if one_file:
        for loaded in specs:
            errors += folder_problems(loaded)
    errors += entry_point_problems(specs)
    more, warnings = people_problems(specs)
    return errors + more, warnings



