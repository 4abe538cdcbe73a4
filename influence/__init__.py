"""influence: EK-FAC influence functions for flax NNX models.

Public API::

    import influence as inf
    task = inf.tasks.Classification()            # also Regression(), CausalLM()
    factors = inf.fit_factors(model, task, train, strategy="ekfac", key=key)
    scores = inf.pairwise_scores(model, task, factors, queries, train)
    self_inf = inf.self_scores(model, task, factors, train)
    ranking = inf.rank_training(model, task, factors, queries, train, k=10)

Sub-packages loaded on first use: ``inf.lm`` (language models to study), ``inf.query``
(text queries over an LM run), ``inf.reference`` (exact influence and validation),
``inf.hosts`` (several hosts), ``inf.testing`` (small fixtures).
"""

__version__ = "0.1.0"

import importlib

from influence import tasks
from influence.errors import (CheckpointMismatch, DataError, FileFormatError, InfluenceError, MissingCorpusError,
                              TrackingError)
from influence.factors import Factors, fit_factors
from influence.scoring.pairwise import Scores, pairwise_scores, self_scores
from influence.scoring.ranking import Attribution, Ranking, attribute, rank_training
from influence.tasks import Task

_LAZY = {"lm": "influence.lm", "query": "influence.query", "reference": "influence.reference",
         "hosts": "influence.runtime.hosts", "testing": "influence.testing"}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'influence' has no attribute {name!r}")


__all__ = ["Attribution", "CheckpointMismatch", "DataError", "Factors", "FileFormatError", "InfluenceError",
           "MissingCorpusError", "Ranking", "Scores", "Task", "TrackingError", "__version__", "attribute",
           "fit_factors", "hosts", "lm", "pairwise_scores", "query", "rank_training", "reference", "self_scores",
           "tasks", "testing"]
