"""The ``closedloop`` command (:mod:`closedloop.cli.commands` holds the command table)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from closedloop.cli.commands import main as run

    return run(argv)
