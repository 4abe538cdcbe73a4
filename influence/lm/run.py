"""A trained run's folder: loading it (model at the final or any kept checkpoint,
tokenizer, datasets, training metadata) and where its fitted factors live.

Layout of a run folder (written by :class:`influence.lm.Trainer`, see
:mod:`influence.lm.train`; factors by :func:`fit_run_factors` or ``influence fit``)::

    run.json  tokenizer.json  metrics.jsonl
    data/                          train / heldout / documents datasets
    checkpoints/step_NNNNNNN/      kept checkpoints; checkpoints/latest.json names the newest
    factors/<strategy>-<layers>/   fitted factors (factors.npz), see factors_dir
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time

import jax
from datasets import Dataset
from flax import nnx

from influence.fit import fit_factors
from influence.tasks import CausalLM

from . import checkpoint as ckpt
from .generate import generate
from .model import GPT, GPTConfig, init_model
from .sequences import load_splits
from .tokenizer import Tokenizer

FACTORS = "factors"
# While factors are fitted, resumable state lives here inside their folder.
FIT_CHECKPOINT = "checkpoint"


def factors_dir(run_dir: str | pathlib.Path, strategy: str, layers: str) -> pathlib.Path:
    """``<run>/factors/<strategy>-<layers>``: the folder of one fitted configuration.

    ``layers`` is the layer selection as given (a regular expression, ``"mlp"`` or
    ``"all"``); characters other than letters, digits, ``-`` and ``_`` become ``_``. The
    one place that names this folder, so every command finds the same factors.
    """
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in layers)
    return pathlib.Path(run_dir) / FACTORS / f"{strategy}-{safe}"


def layer_pattern(layers: str) -> str | None:
    """The ``layers=`` argument of :func:`influence.fit_factors` for a layer selection:
    ``"all"`` tracks every linear layer (``None``), anything else is a regular expression."""
    return None if layers == "all" else layers


@dataclasses.dataclass
class Run:
    """A training run loaded from its folder.

    ``model`` holds the weights of ``step`` (the final step unless asked otherwise);
    ``train``/``heldout`` are the sequence datasets it was trained and evaluated on, and
    ``documents`` the texts they were cut from; ``info`` is ``run.json`` (configs,
    parameter counts, unigram baseline, summary) and ``state`` the checkpoint's metadata.
    """

    path: pathlib.Path
    model: GPT
    tokenizer: Tokenizer
    config: GPTConfig
    train: Dataset
    heldout: Dataset
    documents: Dataset
    info: dict
    state: dict
    step: int

    @property
    def train_config(self) -> dict:
        return self.info["train_config"]

    @property
    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints kept in this run (the last is the final one)."""
        return sorted(ckpt.list_checkpoints(self.path / "checkpoints"))

    def model_at(self, step: int) -> GPT:
        """The model with the weights of checkpoint ``step`` (see :attr:`checkpoints`)."""
        return _load_model(self.path, self.config, step)

    def generate(self, prompt: str, **kwargs) -> str:
        """Continuation of ``prompt``; see :func:`influence.lm.generate`."""
        return generate(self.model, self.tokenizer, prompt, **kwargs)

    def factors_dir(self, strategy: str, layers: str) -> pathlib.Path:
        """Folder of this run's factors for ``strategy`` and ``layers`` (see :func:`factors_dir`)."""
        return factors_dir(self.path, strategy, layers)


def fit_run_factors(run: Run, strategy: str = "ekfac", layers: str = "mlp", *, fisher: str = "sampled",
                    batch_size: int = 32, max_sequences: int | None = None, seed: int = 0, progress: bool = True,
                    devices=None, blocks: int | None = None, factor_dtype: str = "float32"):
    """Fit factors of ``run``'s model on its training sequences (the first
    ``max_sequences`` only, if given) and save them in :meth:`Run.factors_dir`.

    An interrupted fit resumes from its checkpoint in that folder (removed once the
    factors are saved). Other arguments are :func:`influence.fit_factors`' (``devices``
    is its ``mesh``, ``seed`` seeds its ``key``). Returns ``(factors, path, seconds)``.
    """
    train = run.train if max_sequences is None else run.train.select(range(min(max_sequences, len(run.train))))
    folder = run.factors_dir(strategy, layers)
    checkpoint = folder / FIT_CHECKPOINT
    t0 = time.perf_counter()
    factors = fit_factors(run.model, CausalLM(), train, strategy=strategy, fisher=fisher,
                          layers=layer_pattern(layers), key=jax.random.key(seed), batch_size=batch_size,
                          progress=progress, mesh=devices, blocks=blocks, factor_dtype=factor_dtype,
                          checkpoint_dir=checkpoint, resume=True)
    seconds = time.perf_counter() - t0
    path = factors.save(folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return factors, path, seconds


def _load_model(path: pathlib.Path, config: GPTConfig, step: int) -> GPT:
    found = ckpt.list_checkpoints(path / "checkpoints")
    if step not in found:
        raise ValueError(f"{path} has no checkpoint for step {step}; kept: {sorted(found)}")
    model = init_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = ckpt.load_tree(found[step] / "params.npz", params, ckpt.PARAMS_KIND)
    return nnx.merge(graphdef, params, rest)


def load_run(path: str | pathlib.Path, step: int | None = None) -> Run:
    """Load the run in folder ``path`` at checkpoint ``step`` (default: the newest, which
    is the final weights once training has finished)."""
    path = pathlib.Path(path)
    if not (path / "run.json").exists():
        raise FileNotFoundError(f"{path} is not a training run (no run.json); train one with "
                                f"`influence train --scale tiny --out {path}`")
    info = json.loads((path / "run.json").read_text())
    config = GPTConfig.from_dict(info["model_config"])
    if step is None:
        latest = ckpt.latest_checkpoint(path / "checkpoints")
        if latest is None:
            raise FileNotFoundError(f"{path} has no checkpoint yet")
        step = ckpt.read_state(latest)["step"]
    found = ckpt.list_checkpoints(path / "checkpoints")
    data = load_splits(path / "data")
    return Run(path=path, model=_load_model(path, config, step), tokenizer=Tokenizer.load(path), config=config,
               train=data["train"], heldout=data["heldout"], documents=data["documents"], info=info,
               state=ckpt.read_state(found[step]), step=step)
