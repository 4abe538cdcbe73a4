"""Helpers shared by the tests at this level (fixtures live in conftest.py)."""

import influence as inf
from influence import tasks


def fit_quietly(model, data, task=None, **options):
    """:func:`influence.fit_factors` without a progress bar, for a classifier unless
    ``task`` is given."""
    options.setdefault("progress", False)
    return inf.fit_factors(model, task or tasks.Classification(), data, **options)
