"""Every exception the library raises on purpose, in one place.

Each is a ``ValueError`` (they all report input the library cannot use), and all share
the base :class:`InfluenceError`, so ``except inf.InfluenceError`` catches any of them::

    InfluenceError
    ├── TrackingError       the model's layers cannot be tracked or captured
    ├── DataError           data that cannot be batched (empty, ragged, wrong type)
    ├── TaskError           a Task that breaks its contract (loss not [B], key ignored)
    ├── FileFormatError     a missing, truncated, corrupt or foreign file
    ├── ModelMismatch       factors (or a checkpoint) of a model of another structure
    ├── CheckpointMismatch  a checkpoint of another run (other data or settings)
    ├── DegenerateCurvature a layer whose fitted curvature is all zero (no default damping)
    ├── CheckpointError     a pretrained (Hugging Face) model folder that cannot be loaded
    ├── MissingCorpusError  a text corpus whose package is not installed (influence.lm)
    ├── ConfigError         an argument or setting out of range or of an unknown name
    ├── ConfigTypeError     an argument of the wrong type (also a TypeError)
    ├── NonFiniteError      NaN/Inf in a model, loss, gradient or factors (also a FloatingPointError)
    ├── MissingFileError    a file or folder that is not there (also a FileNotFoundError)
    ├── OutputPathError     an output path that cannot be written (the command line)
    ├── Unsupported         a case the library does not implement (also a NotImplementedError)
    └── MissingPackageError an optional package that is not installed (also a ModuleNotFoundError)

Each class that stands for a built-in error also subclasses it, so ``except
FloatingPointError`` (or ``FileNotFoundError``, ...) written against earlier versions
still catches it. What the library leaves out is warned about, never silent:
:class:`UntrackedParametersWarning` (parameters outside the tracked layers).
"""

from __future__ import annotations


class InfluenceError(ValueError):
    """Base of the library's own errors."""


class TrackingError(InfluenceError):
    """The model's layers cannot be tracked or captured: no trackable layer, a ``layers=``
    entry that matches none, a layer kind or setting that is not supported (e.g. a grouped
    convolution), or a layer called twice in one forward pass (shared weights)."""


class DataError(InfluenceError):
    """The data cannot be batched: empty, ragged, or of a type the library cannot read."""


class TaskError(InfluenceError):
    """A :class:`~influence.tasks.Task` breaks its contract, found on the first batch: a
    loss that is not one number per example ``[B]``, or a sampled loss that ignores its
    ``sample_key``."""


class FileFormatError(InfluenceError):
    """A file is missing, truncated, corrupt, or not the kind of file expected."""


class ModelMismatch(InfluenceError):
    """Factors were fitted on a model of another structure (other layers or shapes)."""


class CheckpointMismatch(InfluenceError):
    """A checkpoint exists but belongs to another run (settings or data differ)."""


class DegenerateCurvature(InfluenceError):
    """A layer's curvature Λ is all zero (its gradients were zero on the fitting data), so
    the default damping 0.1 × mean(Λ) would be 0; pass ``damping=`` explicitly."""


class CheckpointError(InfluenceError):
    """A pretrained model folder (Hugging Face format, :mod:`influence.pretrained`) cannot be
    loaded: an unsupported architecture or setting, missing, unexpected or mis-shaped
    tensors, a corrupt or absent weights file (e.g. a folder with only ``.bin`` files)."""


class MissingCorpusError(InfluenceError, RuntimeError):
    """A corpus needs a package that is not installed; the message gives the install line."""


class ConfigError(InfluenceError):
    """An argument or setting the library cannot use: out of range, of an unknown name, or
    inconsistent with another; the message names it and the accepted values."""


class ConfigTypeError(InfluenceError, TypeError):
    """An argument of a type the library cannot use (also a ``TypeError``)."""


class NonFiniteError(InfluenceError, FloatingPointError):
    """NaN or Inf in a model's outputs, a loss, gradients or factors (also a
    ``FloatingPointError``; the command line exits 3 on it)."""


class MissingFileError(InfluenceError, FileNotFoundError):
    """A file or folder that should be there is not (also a ``FileNotFoundError``); the
    message says which command makes it."""


class OutputPathError(InfluenceError):
    """An output path that cannot be written (a folder where a file goes, a file in the
    way of a folder, an unwritable parent): found before any work is done."""


class Unsupported(InfluenceError, NotImplementedError):
    """A case the library does not implement, e.g. an exact Fisher for a task without one
    (also a ``NotImplementedError``)."""


class MissingPackageError(InfluenceError, ModuleNotFoundError):
    """An optional package is not installed (also a ``ModuleNotFoundError``, with its
    ``name``); the message gives the install line."""

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


class UntrackedParametersWarning(UserWarning):
    """Parameters of the model lie outside the tracked layers (embeddings, norms, layers
    of a kind that cannot be tracked, layers left out by ``layers=``): their influence is
    not part of any score. ``Factors.metadata["untracked"]`` lists them."""


class RandomStreamsWarning(UserWarning):
    """The model's forward pass draws from ``nnx.Rngs`` streams. They are held fixed (each
    forward pass starts from the stored stream state), so fits and scores are
    deterministic; a draw shaped like the batch (Dropout left on) is then fixed per batch
    position. ``Factors.metadata["rng_streams"]`` lists the streams."""
