"""Thin Airflow operators; each calls one step function from :mod:`closedloop.steps`."""
