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

Every name is imported on first use (PEP 562: ``import influence`` loads no JAX, so
``influence --help`` is fast); the table ``_PUBLIC`` below lists them all.
Sub-packages: ``inf.lm`` (language models to study), ``inf.query``
(text queries over an LM run), ``inf.reference`` (exact influence and validation),
``inf.hosts`` (several hosts), ``inf.testing`` (small fixtures), ``inf.index`` (the gradient
index; ``inf.build_index`` is its builder), ``inf.unrolled`` (metagradients through a
training run: ``inf.metagradient_scores``).
"""

import importlib

from influence._version import __version__

# Every public name, in ONE table: name -> the module that defines it (a name that is the
# module itself, e.g. ``inf.tasks``, maps to that module). Nothing is imported until first
# use (PEP 562), so ``import influence`` and ``influence --help`` do not load JAX; adding
# a public name is one line here (tests/test_api.py checks every entry resolves).
_PUBLIC: dict[str, str] = {
    # errors and warnings (influence.errors: no dependencies)
    "CheckpointMismatch": "influence.errors",
    "ConfigError": "influence.errors",
    "ConfigTypeError": "influence.errors",
    "DataError": "influence.errors",
    "DegenerateCurvature": "influence.errors",
    "FileFormatError": "influence.errors",
    "InfluenceError": "influence.errors",
    "MissingCorpusError": "influence.errors",
    "MissingFileError": "influence.errors",
    "MissingPackageError": "influence.errors",
    "ModelMismatch": "influence.errors",
    "NonFiniteError": "influence.errors",
    "OutputPathError": "influence.errors",
    "TaskError": "influence.errors",
    "TrackingError": "influence.errors",
    "Unsupported": "influence.errors",
    "UntrackedParametersWarning": "influence.errors",
    "RandomStreamsWarning": "influence.errors",
    # the engine
    "Attribution": "influence.scoring.attribution",
    "Execution": "influence.runtime.execution",
    "Factors": "influence.factors",
    "LayerInfo": "influence.capture.tracking",
    "linen_model": "influence.capture.linen",
    "Ranking": "influence.scoring.ranking",
    "STRATEGIES": "influence.curvature",
    "Scores": "influence.scoring.results",
    "SelfScores": "influence.scoring.results",
    "Task": "influence.tasks",
    "attribute": "influence.scoring.attribution",
    "build_index": "influence.index.build",
    "diagnose": "influence.diagnose",
    "enable_compilation_cache": "influence.runtime.compilation",
    "fit_factors": "influence.fit",
    "pairwise_scores": "influence.scoring.pairwise",
    "rank_training": "influence.scoring.ranking",
    "self_scores": "influence.scoring.self_influence",
    "track": "influence.capture.tracking",
    # sub-packages
    "hosts": "influence.scoring.hosts",
    "index": "influence.index",
    "lm": "influence.lm",
    "query": "influence.query",
    "reference": "influence.reference",
    "tasks": "influence.tasks",
    "testing": "influence.testing",
    "unrolled": "influence.unrolled",
    # attribution through training (metagradients) and validation against retraining
    "metagradient_scores": "influence.unrolled.metagradient",
    "validate": "influence.reference.validate",
}


def __getattr__(name: str):
    """Import a public name on first use (PEP 562) and keep it, so the next use is free."""
    module_name = _PUBLIC.get(name)
    if module_name is None:
        raise AttributeError(f"module 'influence' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    # A sub-package's own name resolves to the module; any other name to its attribute.
    value = module if module_name.rsplit(".", 1)[-1] == name and not hasattr(module, name) else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__all__ = ["__version__", *sorted(_PUBLIC)]
