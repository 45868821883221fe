"""The runtime every step shares: the run's context and identity, MLflow tracking, snapshot storage,
the step cache and its plan, sealed results (signing), fault drills, and the page engine.

The step functions themselves are in :mod:`closedloop.steps`; the runtime imports none of them.
"""
