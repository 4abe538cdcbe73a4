"""Loading a trained run: model (final or any kept checkpoint), tokenizer, datasets and
training metadata, for the influence engine and for people."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from datasets import Dataset
from flax import nnx

from . import checkpoint as ckpt
from .generate import generate
from .model import GPT, GPTConfig, init_model
from .sequences import load_splits
from .tokenizer import Tokenizer


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


def _load_model(path: pathlib.Path, config: GPTConfig, step: int) -> GPT:
    found = ckpt.list_checkpoints(path / "checkpoints")
    if step not in found:
        raise ValueError(f"{path} has no checkpoint for step {step}; kept: {sorted(found)}")
    model = init_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = ckpt.load_tree(found[step] / "params.npz", params)
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
