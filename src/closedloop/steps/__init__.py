"""Plain step functions: no Airflow import. A notebook, a test or an operator calls them alike.

Each step takes the validated template (:class:`closedloop.spec.LoadedSpec`), a
:class:`closedloop.runtime.context.RunContext` and the small JSON outputs of the steps before it,
and returns small JSON (URIs, ids, digests, metrics) — never data.
"""
