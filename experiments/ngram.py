"""An n-gram baseline for the scale ladder's held-out loss (issue 26: "each rung clearly
better than an n-gram baseline that the report prints beside it").

Interpolated Kneser-Ney (Chen & Goodman 1998, one absolute discount per order) over the
runs' own token windows: counted on the training split's windows, evaluated on the
held-out split's windows with the models' convention (every target token after a window's
first, context only within the window, so the first positions back off to shorter
contexts), in nats per target token -- the unit of the runs table's held-out loss.

  python -m experiments.ngram --config full --publish docs/experiments/scale-v2/ngram.json

rebuilds the ``full`` configuration's tokenizer and splits for seed 0 exactly as a run does
(``experiments.scale_runs.prepare_data``; needs the corpora of .ci/apt-packages.txt) and
writes the held-out loss of the unigram to 4-gram models.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class KneserNey:
    """Interpolated Kneser-Ney of order ``order`` over token id windows.

    ``p(w | h) = max(c(h w) - D, 0) / c(h) + D · N1+(h •) / c(h) · p_lower(w | h')`` with
    ``h'`` the context without its first token; below the highest order the counts ``c``
    are continuation counts (the number of distinct tokens seen before ``h w``); the
    lowest order interpolates with the uniform distribution over ``vocab_size`` tokens, so
    every token has positive probability and each conditional sums to 1 over the vocabulary.
    """

    def __init__(self, windows: Sequence[np.ndarray], order: int, vocab_size: int, discount: float = 0.75):
        if order < 1 or not 0 < discount < 1:
            raise ValueError(f"order must be >= 1 and discount in (0, 1); got {order}, {discount}")
        self.order, self.vocab, self.d = order, vocab_size, discount
        full: Counter = Counter()
        for w in windows:
            w = [int(t) for t in w]
            for n in range(1, order + 1):
                for i in range(len(w) - n + 1):
                    full[tuple(w[i:i + n])] += 1
        # Highest order (and any n-gram starting a window, whose left context is unknown):
        # plain counts; lower orders: continuation counts N1+(• g).
        cont: Counter = Counter(g[1:] for g in full if len(g) >= 2)
        self.counts: list[dict] = [dict() for _ in range(order + 1)]
        for g, c in full.items():
            n = len(g)
            self.counts[n][g] = c if n == order else cont.get(g, 0) or c
        self.ctx_total: list[dict] = [defaultdict(int) for _ in range(order + 1)]
        self.ctx_types: list[dict] = [defaultdict(int) for _ in range(order + 1)]
        for n in range(1, order + 1):
            for g, c in self.counts[n].items():
                self.ctx_total[n][g[:-1]] += c
                self.ctx_types[n][g[:-1]] += 1

    def prob(self, context: Sequence[int], token: int) -> float:
        """p(token | the last ``order - 1`` tokens of ``context``)."""
        context = tuple(int(t) for t in context)[-(self.order - 1):] if self.order > 1 else ()
        p = 1.0 / self.vocab
        for n in range(1, len(context) + 2):
            h = context[len(context) - (n - 1):] if n > 1 else ()
            total = self.ctx_total[n].get(h, 0)
            if total == 0:
                continue  # unseen context: keep the lower order's estimate
            c = self.counts[n].get((*h, int(token)), 0)
            p = max(c - self.d, 0.0) / total + self.d * self.ctx_types[n][h] / total * p
        return p

    def nats(self, windows: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None) -> float:
        """Mean negative log-probability (nats) of every target token (position ≥ 1 with
        mask 1) of ``windows``, each predicted from the tokens before it in its window."""
        total, n = 0.0, 0
        for k, w in enumerate(windows):
            m = masks[k] if masks is not None else np.ones(len(w), bool)
            for i in range(1, len(w)):
                if m[i]:
                    total -= np.log(self.prob(w[max(0, i - self.order + 1):i], w[i]))
                    n += 1
        return total / n


def _windows(split) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from influence.lm.sequences import as_arrays

    ids, mask = as_arrays(split)
    keep = [m.astype(bool) for m in mask]
    return [i[m] for i, m in zip(ids, keep)], [np.ones(int(m.sum()), bool) for m in keep]


def baseline(config: str = "full", seed: int = 0, orders: Sequence[int] = (1, 2, 3, 4),
             work: Path = Path("runs/ngram")) -> dict:
    """Held-out nats per token of Kneser-Ney models of each order on ``config``'s splits
    for ``seed`` (the tokenizer and windows a run of that seed trains on)."""
    from influence.lm import TrainConfig

    from . import scale_runs as steps
    from .mixture import pin_heldout
    from .scale_v2 import V2_CONFIGS, documents

    cfg = V2_CONFIGS[config]
    train_docs, held, _, _ = documents(cfg)
    docs, fraction = pin_heldout(train_docs, held, seed)
    tc = TrainConfig(scale=cfg.scales[0], tokens=1, batch_size=cfg.batch_size, seed=seed, vocab_size=cfg.vocab_size,
                     seq_len=cfg.seq_len, heldout_fraction=fraction, split_by="doc", n_checkpoints=2)
    # prepare_data reuses whatever a folder holds: key the folder by what the data depend on.
    key = hashlib.sha256(json.dumps([sorted(d.doc_id for d in docs), dataclasses.asdict(tc)], default=str)
                         .encode()).hexdigest()[:12]
    run_dir = work / f"{config}-seed{seed}-{key}"
    info = steps.prepare_data(run_dir, tc, docs)
    return {"config": config, "seed": seed, "train_sequences": info["train_sequences"],
            **heldout_nats(run_dir / "data", cfg.vocab_size, orders)}


def heldout_nats(data_dir: Path, vocab_size: int, orders: Sequence[int] = (1, 2, 3, 4)) -> dict:
    """``{"heldout_sequences", "vocab_size", "discount", "heldout_nats": {order: nats per
    target token}}`` of Kneser-Ney models fitted on the ``train`` split of ``data_dir``
    (a run's ``data/``) and scored on its ``heldout`` split."""
    from influence.lm.sequences import load_splits

    data = load_splits(Path(data_dir))
    train, _ = _windows(data["train"])
    heldout, hmask = _windows(data["heldout"])
    out = {"heldout_sequences": len(heldout), "vocab_size": vocab_size, "discount": 0.75, "heldout_nats": {}}
    for n in orders:
        out["heldout_nats"][str(n)] = round(KneserNey(train, n, vocab_size).nats(heldout, hmask), 4)
    return out


NAMES = {"1": "unigram", "2": "bigram", "3": "trigram", "4": "4-gram"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.ngram", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--publish", type=Path, help="write the result (JSON) here")
    args = parser.parse_args(argv)
    res = baseline(args.config, args.seed)
    print(json.dumps(res, indent=1))
    if args.publish:
        from influence.runtime.io import atomic_write_json

        atomic_write_json(args.publish, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
