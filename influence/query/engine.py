"""From text queries to ranked, attributed training sequences.

A query is a prompt and a completion. Its measurement is the completion's loss given the
prompt (the prompt's tokens are masked out), so a positive influence means that
upweighting the training sequence makes the model more likely to complete the prompt
this way. Many queries are answered together, in one streaming pass over the training
set per batch of queries.

    engine = QueryEngine(model, tokenizer, train_dataset, factors, context_length=128)
    results = engine.run([Query("ROMEO:\\n", "But soft, what light")], k=10)
    results[0].influences[0].text, .score, .token_scores, .layer_scores, .metadata
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from influence.errors import ConfigError, NonFiniteError
from influence.factors import Factors
from influence.query.bm25 import BM25
from influence.runtime import io
from influence.runtime.execution import Execution
from influence.scoring.attribution import attribute
from influence.scoring.ranking import Ranking, rank_training
from influence.tasks import CausalLM, Task

CONCENTRATION_THRESHOLD = 2.0 / 3.0
# Each token's (start, end) character range in the text column, as influence.lm writes them.
OFFSET_COLUMNS = ("token_starts", "token_ends")


class TokenizerLike(Protocol):
    pad_id: int
    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def token_strings(self, ids: Sequence[int]) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class Query:
    """A prompt and the completion whose probability is explained."""

    prompt: str
    completion: str
    id: str | None = None

    KEYS = ("prompt", "completion", "id")

    @classmethod
    def from_dict(cls, d: dict) -> Query:
        """A query from ``{"prompt": str, "completion": str, "id": str | int (optional)}``.

        Strict, so that a typo or a wrong type is an error rather than a query about
        other text: other keys are refused, and nothing is converted but an int ``id``.

        Raises:
          ValueError: not an object, a missing or unknown key, or a value of another type.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a query is a JSON object {{\"prompt\": ..., \"completion\": ...}}, "
                             f"got {type(d).__name__} {_short(d)}")
        missing = [k for k in ("prompt", "completion") if k not in d]
        if missing:
            raise ConfigError(f"a query needs 'prompt' and 'completion'; missing {missing} in {_short(d)}")
        unknown = sorted(set(d) - set(cls.KEYS))
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in a query; the keys are {list(cls.KEYS)}")
        for key in ("prompt", "completion"):
            if not isinstance(d[key], str):
                raise ConfigError(f"{key!r} must be a string, got {type(d[key]).__name__} {_short(d[key])}")
        qid = d.get("id")
        if qid is not None and (isinstance(qid, bool) or not isinstance(qid, (str, int))):
            raise ConfigError(f"'id' must be a string or an integer, got {type(qid).__name__} {_short(qid)}")
        return cls(d["prompt"], d["completion"], None if qid is None else str(qid))


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclasses.dataclass
class TrainingInfluence:
    """One training sequence's influence on one query.

    ``token_scores[i]`` is the share of ``score`` of the i-th token of ``tokens``; the
    share of position t is shown on the token predicted there (t+1), so the first token
    shows 0. They sum to ``score``, as do ``layer_scores``. ``concentration`` is
    ‖v‖₂/‖v‖₁ of the token scores; above 2/3 the influence sits on a few tokens.
    """

    rank: int
    row: int
    score: float
    tokens: list[str]
    token_scores: list[float]
    layer_scores: dict[str, float]
    metadata: dict[str, Any]
    concentration: float

    @property
    def concentrated(self) -> bool:
        return self.concentration > CONCENTRATION_THRESHOLD

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["concentrated"] = self.concentrated
        d["text"] = self.text
        return d


@dataclasses.dataclass
class QueryResult:
    """A query, its measurement, and its most influential training sequences."""

    query: Query
    loss: float  # the completion's summed negative log-likelihood given the prompt (nats)
    completion_tokens: int
    influences: list[TrainingInfluence]

    def to_dict(self) -> dict:
        return {"query": dataclasses.asdict(self.query), "loss": self.loss,
                "completion_tokens": self.completion_tokens,
                "influences": [i.to_dict() for i in self.influences]}


def concentration(v: np.ndarray) -> float:
    """‖v‖₂ / ‖v‖₁ (1 for a single nonzero entry, 1/√n for n equal entries); 0 for v = 0."""
    l1 = float(np.abs(v).sum())
    return float(np.linalg.norm(v) / l1) if l1 > 0 else 0.0


def encode_queries(queries: Sequence[Query], tokenizer: TokenizerLike, context_length: int, *,
                   input_key: str = "input_ids", mask_key: str = "loss_mask") -> dict[str, np.ndarray]:
    """Token ids (``input_key``) and loss mask (``mask_key``), int32 ``[Q, T]`` (T = the
    longest query), prompt tokens masked out. An empty prompt becomes the document-start
    token, so the first completion token is predicted too.

    Raises:
      ValueError: an empty completion, or a query longer than ``context_length``.
    """
    if not queries:
        raise ConfigError("no queries given")
    rows = []
    for i, q in enumerate(queries):
        prompt = tokenizer.encode(q.prompt) if q.prompt else [tokenizer.bos_id]
        completion = tokenizer.encode(q.completion)
        label = q.id or f"query {i}"
        if not completion:
            raise ConfigError(f"{label}: the completion is empty; give the text whose probability should be explained")
        if len(prompt) + len(completion) > context_length:
            raise ConfigError(
                f"{label}: {len(prompt)} prompt + {len(completion)} completion tokens exceed the model's context of "
                f"{context_length} tokens; shorten the prompt or the completion"
            )
        rows.append((prompt + completion, [0] * len(prompt) + [1] * len(completion)))
    length = max(len(ids) for ids, _ in rows)
    ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, (row_ids, row_mask) in enumerate(rows):
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_mask)] = row_mask
    return {input_key: ids, mask_key: mask}


def _display_tokens(row: dict, tokenizer: TokenizerLike, input_column: str, text_column: str,
                    offset_columns: tuple[str, str]) -> list[str]:
    """Each position's text: spans of ``row[text_column]`` when the data set has token
    offsets (exact text, multi-byte characters kept whole), else the tokenizer's strings."""
    ids = np.asarray(row[input_column])
    if all(k in row for k in (text_column, *offset_columns)):
        from influence.lm.tokenizer import token_display_spans  # offsets convention of influence.lm

        starts, ends = offset_columns
        spans = token_display_spans(list(zip(row[starts], row[ends])))
        specials = tokenizer.token_strings(ids)
        out = []
        for t, (a, b) in enumerate(spans):
            if ids[t] == tokenizer.pad_id:
                out.append("")
            elif ids[t] == tokenizer.bos_id:
                out.append(specials[t])
            else:
                out.append(row[text_column][a:b])
        return out
    return [s if i != tokenizer.pad_id else "" for s, i in zip(tokenizer.token_strings(ids), ids)]


class QueryEngine:
    """Answers text queries against a training set with fitted factors.

    Args:
      model: the causal LM (``model(input_ids [B, T]) -> logits [B, T, V]``).
      tokenizer: with ``encode``, ``token_strings``, ``pad_id``, ``bos_id``.
      train: the training sequences (a ``datasets.Dataset`` or dict with the task's
        token-id and loss-mask columns; columns other than those below are shown as
        metadata).
      factors: fitted on ``model`` and ``train``.
      context_length: the model's maximum sequence length.
      task: what is differentiated; default :class:`influence.tasks.CausalLM`. Queries
        are encoded into its ``input_key`` and ``mask_key`` entries (``"input_ids"`` and
        ``"loss_mask"`` for a task without them).
      text_column: each training sequence's exact text: searched by the BM25 prefilter
        and, with ``offset_columns``, cut into the displayed tokens.
      offset_columns: ``(starts, ends)`` columns, int ``[T]``: each token's character
        range in ``text_column``. Without them tokens are shown as the tokenizer's strings.
      query_rank: rank-r query batching (Grosse et al. use 32); ``None`` = full rank.
      bm25_candidates: if set, score only each query's top-M training sequences by BM25
        (faster, but biased towards lexical overlap).
      index: an index of ``train`` (:func:`influence.build_index`): rankings are answered
        from it, without a pass over the training set (attribution still recomputes the
        top sequences' gradients); ``None`` rescans.
      execution, **options: run settings of the ranking and attribution passes
        (:class:`influence.Execution`: ``batch_size``, ``mesh``, ``progress``, checkpointing).

    Not shown as metadata (:attr:`array_columns`): the task's fields and optional fields,
    ``offset_columns`` and ``text_column``.
    """

    def __init__(self, model, tokenizer: TokenizerLike, train, factors: Factors, *, context_length: int,
                 task: Task | None = None, text_column: str = "text",
                 offset_columns: tuple[str, str] = OFFSET_COLUMNS, damping: float | None = None,
                 query_rank: int | None = None, bm25_candidates: int | None = None, index: Any = None,
                 execution: Execution | None = None, **options: Any):
        self.model, self.tokenizer, self.train, self.factors = model, tokenizer, train, factors
        self.context_length = int(context_length)
        self.damping, self.query_rank = damping, query_rank
        self.execution = Execution.of(execution, options)
        self.task = CausalLM() if task is None else task
        self.input_key = getattr(self.task, "input_key", "input_ids")
        self.mask_key = getattr(self.task, "mask_key", "loss_mask")
        self.text_column = text_column
        self.offset_columns = tuple(offset_columns)
        self.array_columns = frozenset((*self.task.fields, *self.task.optional_fields, self.input_key, self.mask_key,
                                        *self.offset_columns, text_column))
        self.bm25_candidates = bm25_candidates
        self.index = index
        self._bm25: BM25 | None = None

    def _candidates(self, queries: Sequence[Query]) -> list[np.ndarray] | None:
        if self.bm25_candidates is None:
            return None
        if self._bm25 is None:
            if self.text_column not in getattr(self.train, "column_names", self.train):
                raise ConfigError(f"the BM25 prefilter needs a {self.text_column!r} column in the training data")
            self._bm25 = BM25(self.train[self.text_column])
        return self._bm25.candidates([q.prompt + q.completion for q in queries], self.bm25_candidates)

    def rank(self, queries: Sequence[Query], k: int = 10,
             scores_path: str | os.PathLike | None = None) -> tuple[dict, Ranking]:
        """Encoded queries and their top-k ranking (no attribution)."""
        batch = self._encode(queries)
        return batch, self._rank(queries, batch, k, scores_path)

    def _encode(self, queries: Sequence[Query]) -> dict[str, np.ndarray]:
        return encode_queries(queries, self.tokenizer, self.context_length, input_key=self.input_key,
                              mask_key=self.mask_key)

    def _rank(self, queries, batch, k, scores_path) -> Ranking:
        return rank_training(self.model, self.task, self.factors, batch, self.train, k=k, damping=self.damping,
                             query_rank=self.query_rank, candidates=self._candidates(queries),
                             scores_path=scores_path, index=self.index, execution=self.execution)

    def run(self, queries: Sequence[Query], k: int = 10,
            scores_path: str | os.PathLike | None = None) -> list[QueryResult]:
        """Rank and attribute: the top-``k`` training sequences of every query.

        Raises:
          FloatingPointError: a query's loss is NaN or infinite (checked before any
            scoring): the model's weights or outputs are not finite.
        """
        queries = [q if isinstance(q, Query) else Query.from_dict(q) for q in queries]
        batch = self._encode(queries)
        losses = np.asarray(self.task.measurement(self.model, batch))
        bad = [i for i in range(len(queries)) if not np.isfinite(losses[i])]
        if bad:
            label = queries[bad[0]].id or f"query {bad[0]}"
            raise NonFiniteError(
                f"{label}: the completion's loss is {losses[bad[0]]} ({len(bad)} of {len(queries)} queries): the "
                "model's outputs are not finite (NaN/Inf weights?); influence is undefined, so nothing was scored. "
                "Check the run's training metrics and retrain from a finite checkpoint")
        ranking = self._rank(queries, batch, k, scores_path)
        pairs = np.array([(q, int(r)) for q in range(len(queries)) for r in ranking.indices[q] if r >= 0], np.int64)
        attribution = attribute(self.model, self.task, self.factors, ranking, self.train, pairs,
                                execution=self.execution) if len(pairs) else None
        results = []
        p = 0
        for qi, query in enumerate(queries):
            influences = []
            for rank, (row, score) in enumerate(zip(ranking.indices[qi], ranking.scores[qi]), start=1):
                if row < 0:
                    continue
                per_layer_token = attribution.per_layer_token[p]  # [L, T]
                p += 1
                record = _row(self.train, int(row))
                position_terms = per_layer_token.sum(axis=0)
                tokens = np.concatenate([[0.0], position_terms[:-1]])  # shown on the predicted token
                influences.append(TrainingInfluence(
                    rank=rank, row=int(row), score=float(score),
                    tokens=_display_tokens(record, self.tokenizer, self.input_key, self.text_column,
                                           self.offset_columns),
                    token_scores=[float(x) for x in tokens],
                    layer_scores={name: float(v)
                                  for name, v in zip(attribution.layer_names, per_layer_token.sum(axis=1))},
                    metadata={k: _plain(v) for k, v in record.items() if k not in self.array_columns},
                    concentration=concentration(position_terms),
                ))
            results.append(QueryResult(query, float(losses[qi]), int(batch[self.mask_key][qi].sum()), influences))
        return results


def _row(data: Any, i: int) -> dict:
    if isinstance(data, dict):
        return {k: v[i] for k, v in data.items()}
    return data[i]


def _plain(value: Any) -> Any:
    """JSON-friendly version of a metadata value."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def write_json(results: Sequence[QueryResult], path: str | os.PathLike, info: dict | None = None) -> Path:
    """Atomically write the results (and ``info`` about the run) as JSON."""
    path = Path(path)
    payload = {"info": info or {}, "results": [r.to_dict() for r in results]}
    io.atomic_write_bytes(path, json.dumps(payload, indent=1, ensure_ascii=False).encode())
    return path


def read_queries(path: str | os.PathLike) -> list[Query]:
    """Queries from a JSON-lines file: one ``{"prompt": ..., "completion": ..., "id": ...}``
    per line (see :meth:`Query.from_dict`); blank lines are skipped.

    Raises:
      ValueError: ``PATH:LINE: what is wrong`` for the first bad line (or a file that
        is not UTF-8 or holds no query).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a queries file is JSON lines") from e
    queries = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            queries.append(Query.from_dict(json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno}); each line is one query object "
                             f'like {{"prompt": "...", "completion": "..."}}') from e
        except ValueError as e:
            raise ConfigError(f"{path}:{n}: {e}") from e
    if not queries:
        raise ConfigError(f"{path}: no queries")
    return queries
