"""Attribution through the training run itself: exact metagradients
(:mod:`.metagradient`) and checkpoint-based trajectory scores (:mod:`.trajectory`)."""

from influence.unrolled.metagradient import (
    TrainingRun,
    full_batch,
    lm_run,
    mean_loss_run,
    metagradient_scores,
    metagradients,
    states_at,
    train,
    train_many,
)

__all__ = ["TrainingRun", "full_batch", "lm_run", "mean_loss_run", "metagradient_scores", "metagradients", "train",
           "train_many", "states_at"]
