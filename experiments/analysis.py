"""From a scored run to per-query metric records, and from records to estimates with
bootstrap confidence intervals over queries.

A record is a flat dict for one query of one (scale, seed, layer set): its id and kind,
then every metric that applies to its kind (see :func:`query_records`); metrics that do
not apply are absent.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from influence.query.bm25 import BM25

from . import metrics as M
from .insertions import insertion_rows
from .mixture import language_of
from .powerlaw import fit_power_law
from .query_set import QuerySpec


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@dataclasses.dataclass
class TrainingTable:
    """The columns of the training set the metrics read, one entry per sequence ``[N]``."""

    text: list[str]
    title: list[str]
    genre: list[str]
    speakers: list[str]
    doc_id: list[str]
    source: list[str]
    chunk: list[int]  # window index in its document; 0 = the document's start (after <|doc|>)

    @classmethod
    def from_dataset(cls, data) -> TrainingTable:
        cols = {f.name: list(data[f.name]) for f in dataclasses.fields(cls)}
        return cls(**cols)

    def __len__(self) -> int:
        return len(self.text)

    @property
    def language(self) -> np.ndarray:
        """``en`` / ``es`` / ``other`` per sequence."""
        return np.array([language_of(s, g) for s, g in zip(self.source, self.genre)])

    def rows_containing(self, needle: str) -> np.ndarray:
        """Rows whose text contains ``needle`` (white space folded). A line cut by a
        window boundary is found by its first half, else its second half, when no window
        holds all of it."""
        texts = [_squash(t) for t in self.text]
        whole = _squash(needle)
        half = max(8, len(whole) // 2)
        for probe in (whole, whole[:half], whole[-half:]):
            rows = np.array([i for i, t in enumerate(texts) if probe in t], np.int64)
            if len(rows):
                return rows
        return np.zeros(0, np.int64)

    def rows_holding(self, doc_id: str, passage: str) -> np.ndarray:
        """Rows of document ``doc_id`` that hold ``passage`` (white space folded): the one
        window holding all of it, else every window holding its first or its second half
        (a passage cut by a window boundary has two source windows). Empty if none."""
        rows = [i for i, d in enumerate(self.doc_id) if d == doc_id]
        texts = {i: _squash(self.text[i]) for i in rows}
        whole = _squash(passage)
        found = [i for i in rows if whole in texts[i]]
        if not found:
            half = max(8, len(whole) // 2)
            found = [i for i in rows if whole[:half] in texts[i] or whole[-half:] in texts[i]]
        return np.array(found, np.int64)


@dataclasses.dataclass
class Context:
    """Per-run helpers shared by all queries: the table, its BM25 index, word n-gram sets
    (for Jaccard) and each insertion's training rows."""

    table: TrainingTable
    bm25: BM25
    grams: dict[int, list[set]]
    insertions: dict[tuple[str, str], list[int]]

    @classmethod
    def build(cls, table: TrainingTable) -> Context:
        return cls(table, BM25(table.text), {n: [M.ngrams(t, n) for t in table.text] for n in (1, 2)},
                   insertion_rows(table.doc_id))

    def jaccard(self, query: str, n: int) -> np.ndarray:
        q = M.ngrams(query, n)
        return np.array([M.jaccard(q, g) for g in self.grams[n]])


def _surface(rec: dict, spec: QuerySpec, s: np.ndarray, top: np.ndarray, ctx: Context) -> np.ndarray:
    bm = ctx.bm25.scores(spec.text)
    rec["bm25_spearman"] = M.spearman(s, bm)
    rec["bm25_top"] = float(bm[top].mean())
    rec["bm25_all"] = float(bm.mean())
    rec["bm25_pct"] = float(M.percentile_in(bm, top).mean())
    starts = np.asarray(ctx.table.chunk) == 0
    inserted = np.asarray(ctx.table.source) == "insertion"
    rec["insertion_top"] = float(inserted[top].mean())  # the register confound of v1's paraphrases
    rec["insertion_all"] = float(inserted.mean())
    rec["doc_start_top"] = float(starts[top].mean())
    rec["doc_start_all"] = float(starts.mean())
    for n in (1, 2):
        j = ctx.jaccard(spec.text, n)
        rec[f"jaccard{n}_top"] = float(j[top].mean())
        rec[f"jaccard{n}_all"] = float(j.mean())
    return bm


def _thematic(rec: dict, spec: QuerySpec, top: np.ndarray, table: TrainingTable) -> None:
    titles, genres, speakers = (np.array(getattr(table, c), dtype=object) for c in ("title", "genre", "speakers"))
    rec["same_title"] = M.agreement(list(titles[top]), spec.title)
    rec["same_genre"] = M.agreement(list(genres[top]), spec.genre)
    rec["same_title_base"] = M.agreement(list(titles), spec.title)
    rec["same_genre_base"] = M.agreement(list(genres), spec.genre)
    if spec.speaker:  # verses have a book (title) but no speaker
        rec["same_speaker"] = M.agreement(list(speakers[top]), spec.speaker, M.speaker_match)
        rec["same_speaker_base"] = M.agreement(list(speakers), spec.speaker, M.speaker_match)


def _insertion(rec: dict, spec: QuerySpec, s: np.ndarray, k: int, ctx: Context) -> None:
    rows = {role: r for (ins, role), r in ctx.insertions.items() if ins == spec.insertion}
    if spec.kind == "fact_order":
        fwd, rev = rows["forward"], rows["reversed"]
        rec["forward_score"], rec["reversed_score"] = float(s[fwd].sum()), float(s[rev].sum())
        rec["forward_rank"], rec["reversed_rank"] = int(M.ranks_of(s, fwd).min()), int(M.ranks_of(s, rev).min())
        # Background-subtracted: what a statement adds over an average sequence (the mean
        # score over all N), so a trend in overall sparsity does not pass for word order.
        background = float(s.mean())
        rec["background_score"] = background
        rec["forward_excess"] = rec["forward_score"] - len(fwd) * background
        rec["reversed_excess"] = rec["reversed_score"] - len(rev) * background
    elif spec.kind == "fact_once":
        rec["insertion_rank"] = int(M.ranks_of(s, rows["once"]).min())
    elif spec.kind == "canary":
        copies = rows["copy"]
        ranks = M.ranks_of(s, copies)
        rec["copies"] = len(copies)
        # The copies as one unit: their summed score, ranked among the other sequences'.
        summed = float(s[copies].sum())
        others = np.delete(s, copies)
        rec["canary_sum_score"] = summed
        rec["canary_sum_rank"] = 1 + int(np.sum(others > summed))
        positive = float(np.clip(s, 0, None).sum())
        rec["canary_share"] = float(np.clip(s[copies], 0, None).sum() / positive) if positive > 0 else float("nan")
        rec["insertion_rank"] = int(ranks.min())
        rec["canary_median_rank"] = float(np.median(ranks))
        rec["canary_precision"] = float(np.isin(M.top_k(s, len(copies)), copies).mean())


SEMANTIC_KINDS = ("semantic", "semantic_control")


def _semantic(rec: dict, spec: QuerySpec, s: np.ndarray, bm: np.ndarray, ctx: Context,
              groups: dict[str, np.ndarray] | None = None) -> None:
    """The semantic-source test: where the KJV sequence(s) holding the queried verse rank
    by influence and by BM25 (reciprocal rank, recall@10), and the partial rank correlation
    of influence with the link (1 on the source rows, 0 elsewhere) controlling for BM25."""
    rows = ctx.table.rows_holding(spec.source_doc, spec.source_text)
    rec["semantic_rows"] = rows.tolist()
    if not len(rows):
        return
    rec["semantic_rank"] = int(M.ranks_of(s, rows).min())
    rec["semantic_bm25_rank"] = int(M.ranks_of(bm, rows).min())
    rec["semantic_rr"] = M.reciprocal_rank(s, rows)
    rec["semantic_bm25_rr"] = M.reciprocal_rank(bm, rows)
    rec["semantic_rr_minus_bm25"] = rec["semantic_rr"] - rec["semantic_bm25_rr"]
    if rec["semantic_bm25_rank"] > 10:  # the lexically hard verses: BM25 misses the source's top 10
        rec["semantic_rr_bm25_miss"] = rec["semantic_rr"]
    rec["semantic_recall10"] = M.recall_at_k(s, rows, 10)
    rec["semantic_bm25_recall10"] = M.recall_at_k(bm, rows, 10)
    link = np.zeros(len(s))
    link[rows] = 1.0
    rec["semantic_partial"] = M.partial_spearman(s, link, bm)
    for third, scores in (groups or {}).items():  # influence restricted to a layer group (paper §5.3)
        rec[f"semantic_rr_{third}"] = M.reciprocal_rank(scores, rows)


def query_records(specs: Sequence[QuerySpec], values: np.ndarray, per_layer: dict[str, np.ndarray], ctx: Context,
                  *, n_blocks: int, k: int = 10, powerlaw_boot: int = 100, seed: int = 0) -> list[dict]:
    """One record per query from its scores over the training set.

    Args:
      values: float ``[Q, N]`` influence of every training sequence on every query.
      per_layer: layer name -> ``[Q, N]``, summing to ``values``.
      n_blocks: transformer blocks of the model (for the layer thirds).
      k: size of the top set whose overlap, themes and layers are measured.
    """
    records = []
    for i, spec in enumerate(specs):
        s = np.asarray(values[i], np.float64)
        top = M.top_k(s, k)
        rec: dict = {"id": spec.id, "kind": spec.kind, "top_rows": top.tolist(), "top_scores": s[top].tolist(),
                     "top1_share": M.top_share(s, 0.01), "max_score": float(s.max()),
                     "positive_fraction": float(np.mean(s > 0))}
        try:
            fit = fit_power_law(s, n_boot=powerlaw_boot, seed=seed + i)
            rec.update(alpha=fit.alpha, xmin=fit.xmin, tail_n=fit.n_tail, ks=fit.ks)
            if np.isfinite(fit.p_value):  # no p-value without bootstrap data sets (powerlaw_boot = 0)
                rec.update(ks_p=fit.p_value, power_law_plausible=float(fit.p_value > 0.1))
        except ValueError:  # too few positive scores for a tail
            pass
        bm = _surface(rec, spec, s, top, ctx)
        if spec.title:
            _thematic(rec, spec, top, ctx.table)
        if spec.source_text:
            rows = ctx.table.rows_containing(spec.source_text)
            if len(rows):
                rec["source_rank"] = int(M.ranks_of(s, rows).min())
                rec["source_pct"] = rec["source_rank"] / len(s)
                rec["source_bm25_rank"] = int(M.ranks_of(bm, rows).min())
        totals = {name: float(v[i, top].sum()) for name, v in per_layer.items()}
        rec.update({f"layer_{t}": v for t, v in M.third_shares(totals, n_blocks).items()})
        rec["block_shares"] = M.block_shares(totals, n_blocks)
        if spec.insertion:
            _insertion(rec, spec, s, k, ctx)
        if spec.kind in SEMANTIC_KINDS:
            groups = {}
            for name, v in per_layer.items():
                third = M.layer_third(name, n_blocks)
                groups[third] = groups.get(third, 0.0) + np.asarray(v[i], np.float64)
            _semantic(rec, spec, s, bm, ctx, groups)
        if spec.completion_of:
            rec["completion_of"] = spec.completion_of
        records.append(rec)
    _crosslingual(records, specs, values, ctx, k)
    return records


def _crosslingual(records: list[dict], specs: Sequence[QuerySpec], values: np.ndarray, ctx: Context, k: int) -> None:
    """Add to each English query of a pair the transfer of its top English sequences to
    the Spanish query (``transfer_ratio``, ``transfer_pct``), and to each Spanish query
    that of its top Spanish sequences to the English one (``transfer_back_ratio``,
    ``transfer_back_pct``).

    The control ``..._pct_control`` is the same percentile on the *other* pairs' queries in
    the target language (mean over them): Bible-like text in general, not this verse's
    translation. Transfer specific to the verse shows as ``_pct`` above ``_pct_control``.
    """
    lang = ctx.table.language
    index = {(s.pair, s.lang): i for i, s in enumerate(specs) if s.kind == "crosslingual"}
    for (pair, lg), i in index.items():
        target = "es" if lg == "en" else "en"
        other = index.get((pair, target))
        if other is None:
            continue
        ratio, pct, _ = M.crosslingual_transfer(values[i], values[other], lang == lg, k)
        prefix = "transfer" if lg == "en" else "transfer_back"
        records[i][f"{prefix}_ratio"], records[i][f"{prefix}_pct"] = ratio, pct
        controls = [M.crosslingual_transfer(values[i], values[j], lang == lg, k)[1]
                    for (p, p_lang), j in index.items() if p_lang == target and p != pair]
        if controls:
            records[i][f"{prefix}_pct_control"] = float(np.mean(controls))


# --------------------------------------------------------------------------- aggregation


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A statistic over queries with its bootstrap interval; ``n`` queries used."""

    value: float
    low: float
    high: float
    n: int

    def fmt(self, digits: int = 3) -> str:
        if not np.isfinite(self.value):
            return "–"
        f = f"{{:.{digits}g}}"
        ci = f" [{f.format(self.low)}, {f.format(self.high)}]" if np.isfinite(self.low) else ""
        return f"{f.format(self.value)}{ci}"


def estimate(records: Sequence[dict], metric: str, kinds: Sequence[str] | None = None, stat: str = "mean",
             *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """``stat`` (``mean`` or ``median``) of ``metric`` over the records of ``kinds`` (all
    when ``None``) that have it, with a 95% bootstrap interval over those queries."""
    vals = np.array([r[metric] for r in records if metric in r and (kinds is None or r["kind"] in kinds)], np.float64)
    fn = np.median if stat == "median" else np.mean
    value, low, high = M.bootstrap_ci(vals, fn, n_boot=n_boot, seed=seed)
    return Estimate(value, low, high, int(np.sum(~np.isnan(vals))))


def ratio_estimate(records: Sequence[dict], num: str, den: str, kinds: Sequence[str], *, n_boot: int = 2000,
                   seed: int = 0) -> Estimate:
    """Σ num / Σ den over the records of ``kinds`` (e.g. reversed ÷ forward influence over
    facts), with a bootstrap interval resampling records."""
    pairs = np.array([(r[den], r[num]) for r in records if r["kind"] in kinds and num in r and den in r], np.float64)
    if not len(pairs):
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value, low, high = M.bootstrap_ci(pairs, M.ratio_of_sums, n_boot=n_boot, seed=seed)
    return Estimate(value, low, high, len(pairs))
