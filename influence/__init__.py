"""influence: EK-FAC influence functions for flax NNX models.

Public API::

    import influence as inf
    task = inf.tasks.Classification()            # also Regression(), CausalLM()
    factors = inf.fit_factors(model, task, train, strategy="ekfac", key=key)
    scores = inf.pairwise_scores(model, task, factors, queries, train)
    self_inf = inf.self_scores(model, task, factors, train)
"""

__version__ = "0.1.0"

from influence import tasks  # noqa: E402
from influence.factors import Factors, fit_factors  # noqa: E402
from influence.scores import Scores, pairwise_scores, self_scores  # noqa: E402
from influence.tasks import Task  # noqa: E402
from influence import hosts  # noqa: E402  (needs scores)

__all__ = ["Factors", "Scores", "Task", "fit_factors", "hosts", "pairwise_scores", "self_scores", "tasks", "__version__"]
