"""The example domain: car-following (longitudinal control) for an automated vehicle.

Everything driving-specific lives here and is reached only through the entry points a
pipeline template names (``dataset.generator``, ``label_policy.entry_point``,
``training.entry_point``, ``simulation.entry_point``). A company replaces this package with
its own code by naming other entry points; nothing else in ``closedloop`` knows driving.
"""
