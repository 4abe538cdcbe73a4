"""influence: EK-FAC influence functions for flax NNX models.

Public API::

    import influence as inf
    task = inf.tasks.Classification()            # also Regression(), CausalLM()
    factors = inf.fit_factors(model, task, train, strategy="ekfac", key=key)
    scores = inf.pairwise_scores(model, task, factors, queries, train)
    self_inf = inf.self_scores(model, task, factors, train)   # .values [n_train]
    ranking = inf.rank_training(model, task, factors, queries, train, k=10)
    index = inf.build_index(model, task, factors, train, path="index")  # then index= answers without a rescan
    run = inf.Execution(batch_size=128, checkpoint_dir="ckpt")  # run settings of any of them
    inf.enable_compilation_cache()               # compile each step once per machine, not per process

Sub-packages loaded on first use: ``inf.lm`` (language models to study), ``inf.query``
(text queries over an LM run), ``inf.reference`` (exact influence and validation),
``inf.hosts`` (several hosts), ``inf.testing`` (small fixtures), ``inf.index`` (the gradient
index; ``inf.build_index`` is its builder).
"""

import importlib

from influence import tasks
from influence._version import __version__
from influence.capture.linen import linen_model  # issue 24
from influence.capture.tracking import LayerInfo, track
from influence.curvature import STRATEGIES
from influence.errors import (
    CheckpointMismatch,
    DataError,
    DegenerateCurvature,
    FileFormatError,
    InfluenceError,
    MissingCorpusError,
    ModelMismatch,
    RandomStreamsWarning,
    TaskError,
    TrackingError,
    UntrackedParametersWarning,
)
from influence.factors import Factors
from influence.fit import fit_factors
from influence.runtime.compilation import enable_compilation_cache
from influence.runtime.execution import Execution
from influence.scoring.attribution import Attribution, attribute
from influence.scoring.pairwise import pairwise_scores
from influence.scoring.ranking import Ranking, rank_training
from influence.scoring.results import Scores, SelfScores
from influence.scoring.self_influence import self_scores
from influence.tasks import Task

_LAZY = {"lm": "influence.lm", "query": "influence.query", "reference": "influence.reference",
         "hosts": "influence.scoring.hosts", "testing": "influence.testing", "index": "influence.index"}
_LAZY_NAMES = {"build_index": ("influence.index.build", "build_index")}
_LAZY_NAMES["diagnose"] = ("influence.diagnose", "diagnose")  # issue 24


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    if name in _LAZY_NAMES:
        module_name, attribute = _LAZY_NAMES[name]
        value = getattr(importlib.import_module(module_name), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'influence' has no attribute {name!r}")


__all__ = ["STRATEGIES", "Attribution", "CheckpointMismatch", "DataError", "DegenerateCurvature", "Execution",
           "Factors", "FileFormatError", "InfluenceError", "LayerInfo", "MissingCorpusError", "ModelMismatch",
           "Ranking", "Scores", "SelfScores", "Task", "TaskError", "TrackingError", "UntrackedParametersWarning",
           "__version__", "attribute", "build_index", "enable_compilation_cache", "fit_factors", "hosts", "index",
           "lm", "pairwise_scores", "query", "rank_training", "reference", "self_scores", "tasks", "testing", "track"]
__all__ += ["RandomStreamsWarning"]  # issue 24
__all__ += ["linen_model"]  # issue 24
__all__ += ["diagnose"]  # issue 24
