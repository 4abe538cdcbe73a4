"""A trained run's folder: loading it (model at the final or any kept checkpoint,
tokenizer, datasets, training metadata) and where its fitted factors live.

Layout of a run folder (written by :class:`influence.lm.Trainer`, see
:mod:`influence.lm.train`; factors by :func:`fit_run_factors` or ``influence fit``)::

    run.json  tokenizer.json  metrics.jsonl
    data/                          train / heldout / documents datasets
    checkpoints/step_NNNNNNN/      kept checkpoints; checkpoints/latest.json names the newest
    factors/<strategy>-<layers>-<digest>/   fitted factors (factors.npz) and the settings
                                   they were fitted with (settings.json), see factors_dir
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import shutil
import time

import jax
import numpy as np
from datasets import Dataset
from flax import nnx

from influence.errors import ConfigError, MissingFileError
from influence.fit import fit_factors
from influence.runtime import io
from influence.tasks import CausalLM

from . import checkpoint as ckpt
from .generate import generate
from .model import GPT, GPTConfig, init_model
from .sequences import load_splits
from .tokenizer import Tokenizer

FACTORS = "factors"
# While factors are fitted, resumable state lives here inside their folder.
FIT_CHECKPOINT = "checkpoint"


# Beside factors.npz: every setting the factors depend on (see factor_settings).
SETTINGS = "settings.json"
# The readable part of a folder name is cut here; the digest keeps long selections apart.
_READABLE = 24


def factor_settings(run_dir: str | pathlib.Path, strategy: str = "ekfac", layers: str = "mlp", *,
                    fisher: str = "sampled", seed: int = 0, max_sequences: int | None = None,
                    blocks: int | None = None, factor_dtype: str = "float32", step: int | None = None) -> dict:
    """Every setting that changes a run's fitted factors, as stored in ``settings.json``.

    ``layers`` is kept as given (``"mlp|fc_in"`` and ``"mlp.fc_in"`` are different
    selections); ``max_sequences`` becomes the number of training sequences actually
    fitted on (so a cap above the data set's size is the whole set); ``step`` is the
    checkpoint whose weights are fitted (default: the run's newest), and
    ``weights_digest`` the SHA-256 of that checkpoint's weights (:func:`weights_digest`),
    so factors of weights overwritten at the same step never match.
    """
    run_dir = pathlib.Path(run_dir)
    info = _read_info(run_dir)
    n_train = int(info["data"]["train_sequences"])
    if max_sequences is not None and max_sequences < 1:
        raise ConfigError(f"max_sequences must be a positive number of sequences, got {max_sequences}")
    if step is None:
        step = _latest_step(run_dir)
    return {"strategy": strategy, "layers": layers, "fisher": fisher, "seed": int(seed),
            "sequences": n_train if max_sequences is None else min(int(max_sequences), n_train),
            "blocks": None if blocks is None else int(blocks), "factor_dtype": str(factor_dtype), "step": int(step),
            "weights_digest": weights_digest(run_dir, int(step))}


def weights_digest(run_dir: str | pathlib.Path, step: int) -> str:
    """SHA-256 of the weights of checkpoint ``step`` of a run: every array's name, dtype,
    shape and bytes (the checksum its file carries; a file without one is hashed here).

    A workspace (a pretrained checkpoint and a corpus, :mod:`influence.lm.workspace`) has no
    checkpoints of its own: its digest is the checkpoint folder's fingerprint (config and
    every weights file's bytes) recorded when it was opened, which opening it checks again."""
    info_file = pathlib.Path(run_dir) / "run.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        if info.get("kind") == "pretrained":
            return str(info["model"]["fingerprint"])
    found = ckpt.list_checkpoints(pathlib.Path(run_dir) / "checkpoints")
    if step not in found:
        raise ConfigError(f"{run_dir} has no checkpoint for step {step}; kept: {sorted(found)}")
    file = found[step] / "params.npz"
    digest = io.stored_digest(file)
    if digest is None:  # a run trained before files carried a checksum
        h = hashlib.sha256()
        with np.load(file, allow_pickle=False) as npz:
            io.hash_arrays(h, ((name, npz[name]) for name in sorted(npz.files)))
        digest = h.hexdigest()
    return digest


def factors_dir(run_dir: str | pathlib.Path, strategy: str = "ekfac", layers: str = "mlp", **settings) -> pathlib.Path:
    """``<run>/factors/<strategy>-<layers>-<digest>``: the folder of one fitted configuration.

    The digest (8 hex digits) covers every setting of :func:`factor_settings` (keyword
    arguments are its), so factors fitted with another Fisher, seed, data, block count,
    dtype or checkpoint never share a folder; ``<layers>`` is a readable prefix of the
    selection (characters other than letters, digits, ``-`` and ``_`` become ``_``). The one
    place that names this folder, so every command finds the same factors.
    """
    chosen = factor_settings(run_dir, strategy, layers, **settings)
    return pathlib.Path(run_dir) / FACTORS / folder_name(chosen)


def folder_name(settings: dict) -> str:
    """The folder name of factors fitted with ``settings`` (see :func:`factors_dir`)."""
    # The weights' digest is left out of the name: factors of overwritten weights land in
    # the same folder, whose settings.json then says they are stale (and --force refits).
    named = {k: v for k, v in settings.items() if k != "weights_digest"}
    digest = hashlib.sha256(json.dumps(io.canonical_json(named), sort_keys=True).encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]", "_", settings["layers"])[:_READABLE]
    return f"{settings['strategy']}-{readable}-{digest}"


def read_settings(folder: str | pathlib.Path) -> dict | None:
    """The settings a factors folder was fitted with, or ``None`` for a folder without
    them (written by a version that did not key folders by their settings)."""
    file = pathlib.Path(folder) / SETTINGS
    if not file.exists():
        return None
    return json.loads(file.read_text())


def fitted_factors(run_dir: str | pathlib.Path) -> list[tuple[pathlib.Path, dict | None]]:
    """Every folder of ``run_dir`` holding fitted factors (``factors.npz``) with its
    settings (``None`` for an old-style folder without ``settings.json``), sorted by name."""
    root = pathlib.Path(run_dir) / FACTORS
    if not root.is_dir():
        return []
    return [(d, read_settings(d)) for d in sorted(root.iterdir()) if (d / "factors.npz").is_file()]


def describe_settings(settings: dict) -> str:
    """``fisher=sampled, seed=0, ...``: the settings beyond strategy and layers, for messages."""
    return ", ".join(f"{k}={str(v)[:12] if k == 'weights_digest' else v}" for k, v in settings.items()
                     if k not in ("strategy", "layers"))


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

    def factors_dir(self, strategy: str = "ekfac", layers: str = "mlp", **settings) -> pathlib.Path:
        """Folder of this run's factors for ``strategy``, ``layers`` and the other settings of
        :func:`factor_settings`, fitted on the weights of :attr:`step` (see :func:`factors_dir`)."""
        return factors_dir(self.path, strategy, layers, **{"step": self.step, **settings})


def fit_run_factors(run: Run, strategy: str = "ekfac", layers: str = "mlp", *, fisher: str = "sampled",
                    batch_size: int | None = None, max_sequences: int | None = None, seed: int = 0,
                    progress: bool = True, devices=None, blocks: int | None = None, factor_dtype: str = "float32",
                    restart: bool = False):
    """Fit factors of ``run``'s model on its training sequences (the first
    ``max_sequences`` only, if given) and save them, with their ``settings.json``, in
    :meth:`Run.factors_dir` of these settings.

    An interrupted fit resumes from its checkpoint in that folder (removed once the
    factors are saved); ``restart=True`` discards that checkpoint first. Other arguments
    are :func:`influence.fit_factors`' (``devices`` is its ``mesh``, ``seed`` seeds its
    ``key``). Returns ``(factors, path, seconds)``.
    """
    settings = factor_settings(run.path, strategy, layers, fisher=fisher, seed=seed, max_sequences=max_sequences,
                               blocks=blocks, factor_dtype=factor_dtype, step=run.step)
    train = run.train.select(range(settings["sequences"])) if settings["sequences"] < len(run.train) else run.train
    folder = run.path / FACTORS / folder_name(settings)
    checkpoint = folder / FIT_CHECKPOINT
    if restart:
        shutil.rmtree(checkpoint, ignore_errors=True)
    # The settings go first: a folder whose factors.npz is there always says what it holds.
    io.atomic_write_json(folder / SETTINGS, settings)
    t0 = time.perf_counter()
    factors = fit_factors(run.model, CausalLM(), train, strategy=strategy, fisher=fisher,
                          layers=layer_pattern(layers), key=jax.random.key(seed), batch_size=batch_size,
                          progress=progress, mesh=devices, blocks=blocks, factor_dtype=factor_dtype,
                          checkpoint_dir=checkpoint, resume=True)
    seconds = time.perf_counter() - t0
    path = factors.save(folder)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return factors, path, seconds


def _read_info(path: pathlib.Path) -> dict:
    if path.exists() and not path.is_dir():
        raise MissingFileError(f"{path} is a file, not a run folder; give the folder that `influence train --out` "
                                "wrote")
    if not (path / "run.json").is_file():
        raise MissingFileError(f"{path} is not a training run (no run.json); train one with "
                                f"`influence train --scale tiny --out {path}`")
    return json.loads((path / "run.json").read_text())


def _latest_step(path: pathlib.Path) -> int:
    if _read_info(path).get("kind") == "pretrained":  # a workspace (lm.workspace): one set of weights
        return 0
    latest = ckpt.latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise MissingFileError(f"{path} has no checkpoint yet")
    return int(ckpt.read_state(latest)["step"])


def _load_model(path: pathlib.Path, config: GPTConfig, step: int) -> GPT:
    found = ckpt.list_checkpoints(path / "checkpoints")
    if step not in found:
        raise ConfigError(f"{path} has no checkpoint for step {step}; kept: {sorted(found)}")
    model = init_model(config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = ckpt.load_tree(found[step] / "params.npz", params, ckpt.PARAMS_KIND)
    return nnx.merge(graphdef, params, rest)


def load_run(path: str | pathlib.Path, step: int | None = None) -> Run:
    """Load the run in folder ``path`` at checkpoint ``step`` (default: the newest, which
    is the final weights once training has finished)."""
    path = pathlib.Path(path)
    info = _read_info(path)
    if info.get("kind") == "pretrained":  # a checkpoint folder and a corpus (influence.lm.workspace)
        from .workspace import workspace_parts

        return Run(**workspace_parts(path, info))
    config = GPTConfig.from_dict(info["model_config"])
    if step is None:
        step = _latest_step(path)
    found = ckpt.list_checkpoints(path / "checkpoints")
    data = load_splits(path / "data")
    return Run(path=path, model=_load_model(path, config, step), tokenizer=Tokenizer.load(path), config=config,
               train=data["train"], heldout=data["heldout"], documents=data["documents"], info=info,
               state=ckpt.read_state(found[step]), step=step)
