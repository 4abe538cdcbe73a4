"""Token-wise attribution statistics of a query's top training sequences (Grosse et al.
2023 §5.3: where inside an influential sequence does its influence sit?).

A sequence's score on a query is the sum of its per-position terms (``per_token``), term
t mostly being the influence of predicting token t+1 there (see
:class:`influence.scoring.attribution.Attribution`). Two statistics per query, averaged
over its top-k sequences:

- ``token_top10_share``: the share of Σ_t |term_t| that the largest 10% of the counted
  positions carry (0.1 if spread evenly, 1 if one tenth holds all). High = concentrated.
- ``token_lexical_enrichment``: the share of the positive influence on positions whose
  target token occurs in the query's completion, divided by the share of such positions
  among the counted ones. 1 = influence no more on the query's own tokens than chance;
  > 1 = it sits on them. A lexical estimator concentrates there; if influence grows more
  abstract with scale, this should fall.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .query_set import QuerySpec

TOP_FRACTION = 0.1


def sequence_statistics(terms: np.ndarray, targets: np.ndarray, mask: np.ndarray,
                        query_tokens: set[int]) -> dict[str, float]:
    """The two statistics of one (query, training sequence) pair.

    Args:
      terms: ``[T-1]`` per-position terms of the score.
      targets: ``[T-1]`` the token each position predicts (input ids shifted by one).
      mask: ``[T-1]`` 1 where the target counts (``loss_mask[1:]``).
      query_tokens: token ids of the query's completion.
    """
    keep = mask > 0
    t, y = np.asarray(terms, np.float64)[keep], np.asarray(targets)[keep]
    out = {"token_top10_share": float("nan"), "token_lexical_enrichment": float("nan")}
    if not len(t):
        return out
    mag = np.sort(np.abs(t))[::-1]
    n_top = max(1, int(np.ceil(TOP_FRACTION * len(t))))
    if mag.sum() > 0:
        out["token_top10_share"] = float(mag[:n_top].sum() / mag.sum())
    lexical = np.isin(y, np.fromiter(query_tokens, np.int64, len(query_tokens)))
    positive = np.maximum(t, 0.0)
    base = lexical.mean()
    if positive.sum() > 0 and 0 < base < 1:
        out["token_lexical_enrichment"] = float(positive[lexical].sum() / positive.sum() / base)
    return out


def token_records(specs: Sequence[QuerySpec], token_terms: np.ndarray, pairs: np.ndarray, input_ids: np.ndarray,
                  loss_mask: np.ndarray, completion_tokens: Sequence[Sequence[int]]) -> list[dict]:
    """Per query, the mean of :func:`sequence_statistics` over its pairs.

    Args:
      token_terms: ``[P, T-1]`` per-position terms of the pairs ``pairs [P, 2]`` of (query
        index, training row).
      input_ids, loss_mask: ``[P, T]`` the paired rows' tokens and loss mask.
      completion_tokens: per query, its completion's token ids.
    """
    out = []
    for i, spec in enumerate(specs):
        mine = np.flatnonzero(pairs[:, 0] == i)
        query_tokens = set(map(int, completion_tokens[i]))
        stats = [sequence_statistics(token_terms[p], input_ids[p, 1:], loss_mask[p, 1:], query_tokens) for p in mine]
        rec = {"id": spec.id}
        for name in ("token_top10_share", "token_lexical_enrichment"):
            vals = [s[name] for s in stats if np.isfinite(s[name])]
            if vals:
                rec[name] = float(np.mean(vals))
        out.append(rec)
    return out


def attribute_top(run, factors, specs: Sequence[QuerySpec], values: np.ndarray, *, k: int) -> list[dict]:
    """:func:`token_records` for ``specs`` (rows of ``values [Q, N]``) over each query's
    top-``k`` sequences, whose terms are recomputed for those pairs only
    (:func:`influence.attribute`: one pass over the Q·k paired rows)."""
    import influence as inf
    from influence.lm.sequences import as_arrays
    from influence.query.engine import encode_queries
    from influence.scoring.preconditioned import query_gradients
    from influence.scoring.ranking import Ranking

    if not len(specs):
        return []
    values = np.asarray(values, np.float64)
    top = np.stack([np.argsort(-v, kind="stable")[:k] for v in values])  # [Q, k]
    pairs = np.stack([np.repeat(np.arange(len(specs)), top.shape[1]), top.reshape(-1)], axis=1)
    task = inf.tasks.CausalLM()
    batch = encode_queries([s.query for s in specs], run.tokenizer, run.config.context_length)
    queries, damping = query_gradients(run.model, task, factors, batch)
    ranking = Ranking(top, values[np.arange(len(specs))[:, None], top].astype(np.float32), queries, damping,
                      len(values[0]))
    attribution = inf.attribute(run.model, task, factors, ranking, run.train, pairs, batch_size=32, progress=False)
    # The terms must sum to the pairs' scores from the full pass: a check that each pair's
    # terms belong to its row and query.
    total, expected = attribution.total, values[pairs[:, 0], pairs[:, 1]]
    scale = float(np.abs(values).max()) or 1.0
    if np.abs(total - expected).max() > 1e-3 * scale:
        raise RuntimeError("per-token terms do not sum to the scores of their pairs "
                           f"(max difference {np.abs(total - expected).max():.3g} of {scale:.3g})")
    ids, mask = as_arrays(run.train.select(pairs[:, 1].tolist()))
    terms = attribution.token  # [P, T]: position t's term; the last position predicts nothing
    if terms.shape[1] == ids.shape[1]:
        if np.abs(terms[:, -1]).max() > 1e-6 * scale:
            raise RuntimeError("the last position, which predicts no token, has a nonzero term")
        terms = terms[:, :-1]
    completions = [b[m > 0] for b, m in zip(batch["input_ids"], batch["loss_mask"])]
    return token_records(specs, terms, pairs, ids, mask, completions)
