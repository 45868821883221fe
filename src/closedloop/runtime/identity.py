"""Code identity: which code computed a result, by content — with or without ``.git``.

A cacheable step's identity is a sha256 over

- the source of the closedloop modules the step executes: its step module (the step table's
  ``code`` column) and every closedloop module it imports, followed through the import
  statements (read from the source, nothing is imported);
- the source of its entry point (the template's generator, label policy, trainer or simulator):
  for an entry point inside closedloop, that module and what it imports; for a company's own
  package, every file of its top-level package (``acme_driving.trainer:fit`` → all of
  ``acme_driving/``);
- the versions of the libraries that compute (:data:`LIBRARIES`) and of Python;
- for a step that runs as a pod, the image reference as the template gives it (a digest where the
  template pins one, ``repo@sha256:…``).

Two different edits give two different identities; the same files give the same identity on any
machine, in a checkout or an image built without ``.git``. The git commit, where there is one,
is recorded beside it (:func:`git_commit`), never keyed on: an unrelated commit does not miss the
cache.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import platform
import subprocess
from pathlib import Path

LIBRARIES = ("numpy", "pandas", "pyarrow", "scikit-learn", "mlflow", "great-expectations")
"""The libraries whose version changes what a step computes (DESIGN: cache key inputs)."""

PACKAGE = "closedloop"
_ROOT = Path(__file__).resolve().parents[1]  # src/closedloop
SKIP_DIRS = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", "node_modules"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def _module_file(module: str) -> Path | None:
    """The source file of a closedloop module, found on disk (no import)."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = _ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Closedloop modules named by the import statements of one file (also those inside functions)."""
    st = path.stat()
    return _parsed_imports(path, module, st.st_mtime_ns, st.st_size)


@functools.cache
def _parsed_imports(path: Path, module: str, mtime_ns: int, size: int) -> frozenset[str]:
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join([*base, node.module] if node.module else base)
            else:
                origin = node.module or ""
            found.add(origin)
            found.update(f"{origin}.{a.name}" for a in node.names)  # `from pkg import submodule`
    out = set()
    for name in found:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))  # parents' __init__ run too
    return frozenset(out)


def module_closure(module: str) -> tuple[Path, ...]:
    """The files of ``module`` and of every closedloop module it imports, transitively, sorted
    (walked again on every call; each file is parsed once per content)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue  # an attribute imported from a module, not a module
        seen[name] = path
        todo.extend(_imports(path, name) - seen.keys())
    return tuple(sorted(set(seen.values())))


def package_files(top: str) -> tuple[Path, ...]:
    """Every file of an installed top-level package or module (no import of it), listed on every
    call: a file added between two runs counts."""
    from closedloop.errors import PermanentError

    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise PermanentError(f"entry point package {top!r} is not installed where this step runs")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs:
        return (Path(spec.origin),) if spec.origin and Path(spec.origin).is_file() else ()
    files = []
    for d in dirs:
        for p in Path(d).rglob("*"):
            if p.is_file() and p.suffix not in SKIP_SUFFIXES and not SKIP_DIRS & set(p.relative_to(d).parts):
                files.append(p)
    return tuple(sorted(files))


def entry_point_files(entry_point: str) -> tuple[Path, ...]:
    """The source an entry point (``package.module:function``) executes."""
    module = entry_point.partition(":")[0]
    top = module.split(".")[0]
    if top == PACKAGE:
        return module_closure(module)
    return package_files(top)


@functools.cache
def libraries() -> dict[str, str]:
    """Versions of the computing libraries (and Python) in this environment."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


@functools.cache
def _file_digest(path: Path, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_digest(paths: tuple[Path, ...]) -> str:
    """sha256 over (relative name, content digest) of each file: renames and edits both count."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        name = p.relative_to(_ROOT.parent).as_posix() if p.is_relative_to(_ROOT.parent) else p.name
        h.update(f"{name}\0{_file_digest(p, st.st_mtime_ns, st.st_size)}\n".encode())
    return h.hexdigest()


def identity(code_module: str, entry_points: tuple[str, ...] = (), image: str | None = None) -> dict:
    """What a step's result depends on besides its data and settings.

    :return: ``{"digest": sha256 of all of it, "code": sha256 of the source, "libraries": {…},
        "image": the pod image or None}``.
    """
    files = set(module_closure(code_module))
    for ep in entry_points:
        files.update(entry_point_files(ep))
    code = files_digest(tuple(sorted(files)))
    parts = {"code": code, "libraries": libraries(), "image": image}
    digest = hashlib.sha256(repr(sorted(parts.items())).encode()).hexdigest()
    return {"digest": digest, **parts}


def of_step(loaded, step_id: str) -> dict:
    """The identity of one step of a template: its code module and entry point from the step
    table, its image when the template runs it as a pod."""
    from closedloop import pipeline

    row = pipeline.step(step_id)
    module = row.code or f"{PACKAGE}.steps"
    entry_points = ()
    if row.entry_point:
        section, _, attr = row.entry_point.partition(".")
        entry_points = (getattr(getattr(loaded.spec, section), attr),)
    pods = loaded.spec.kubernetes
    pod = getattr(pods, step_id, None) if pods is not None else None
    return identity(module, entry_points, pod.image if pod is not None else None)


@functools.cache
def package_digest() -> str:
    """Content digest of the whole closedloop package (the ``+c…`` of :func:`code_version`)."""
    files = tuple(sorted(p for p in _ROOT.rglob("*") if p.is_file() and p.suffix not in SKIP_SUFFIXES
                         and not SKIP_DIRS & set(p.relative_to(_ROOT).parts)))
    return files_digest(files)


@functools.cache
def git_commit() -> str | None:
    """The git commit of the checkout the package runs from (``1a2b3c4d5e6f`` or with
    ``.dirty``), or None outside a checkout (an image, a wheel)."""
    repo = _ROOT.parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}{'.dirty' if dirty else ''}"
