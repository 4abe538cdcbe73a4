"""What the report shows: the metric families of the scale experiment, each a list of
statistics over queries, and their estimates for every run and layer set.

A statistic is the mean or median of a record field over the queries of some kinds, or
a ratio of sums of two fields (reversed ÷ forward influence), each with a 95% bootstrap
interval over queries (:mod:`experiments.analysis`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .analysis import Estimate, estimate, ratio_estimate
from .stats import order_asymmetry

TEXT_KINDS = ("memorised", "paraphrase", "style")


@dataclasses.dataclass(frozen=True)
class Stat:
    """One column: ``field`` of the records of ``kinds`` (all kinds if ``None``),
    summarised by ``how`` (``mean``, ``median``, or ``ratio`` of Σ field ÷ Σ ``den``)."""

    label: str
    field: str
    kinds: tuple[str, ...] | None = None
    how: str = "mean"
    den: str | None = None

    def of(self, records: Sequence[dict], n_boot: int, seed: int = 0) -> Estimate:
        if self.how == "ratio":
            return ratio_estimate(records, self.field, self.den, self.kinds, n_boot=n_boot, seed=seed)
        return estimate(records, self.field, self.kinds, self.how, n_boot=n_boot, seed=seed)


def _per_kind(label: str, field: str, kinds: Sequence[str], how: str = "mean") -> list[Stat]:
    return [Stat(f"{label} ({k})", field, (k,), how) for k in kinds]


FAMILIES: dict[str, tuple[str, list[Stat]]] = {
    "sparsity": ("1. Sparsity of influence (all queries)", [
        Stat("top-1% share of positive influence", "top1_share"),
        Stat("power-law α (median)", "alpha", how="median"),
        Stat("share of queries with power-law p > 0.1", "power_law_plausible"),
        Stat("largest influence (median)", "max_score", how="median"),
        Stat("share of scores > 0", "positive_fraction"),
    ]),
    "sparsity_by_kind": ("1b. Top-1% share by query kind", _per_kind(
        "top-1%", "top1_share", ("memorised", "paraphrase", "style", "fact_once", "fact_order", "canary",
                                 "crosslingual"))),
    "surface": ("2a. Surface overlap of the top-k with the query", [
        *_per_kind("Spearman(influence, BM25), all sequences", "bm25_spearman", TEXT_KINDS),
        Stat("BM25 score of the top-k (mean)", "bm25_top", TEXT_KINDS),
        Stat("BM25 score, corpus mean (baseline)", "bm25_all", TEXT_KINDS),
        *_per_kind("BM25 percentile", "bm25_pct", TEXT_KINDS),
        *_per_kind("word-bigram Jaccard", "jaccard2_top", TEXT_KINDS),
        Stat("word-bigram Jaccard, corpus mean (baseline)", "jaccard2_all", TEXT_KINDS),
        *_per_kind("document starts among the top-k", "doc_start_top", TEXT_KINDS),
        Stat("document starts, corpus share (baseline)", "doc_start_all", TEXT_KINDS),
    ]),
    "thematic": ("2b. Thematic agreement of the top-k", [
        *_per_kind("same play", "same_title", TEXT_KINDS),
        *_per_kind("same speaker", "same_speaker", TEXT_KINDS),
        Stat("same play, corpus base rate", "same_title_base", TEXT_KINDS),
        Stat("same genre (all text kinds)", "same_genre", TEXT_KINDS),
        Stat("same genre, corpus base rate", "same_genre_base", TEXT_KINDS),
    ]),
    "sources": ("2c. Rank of the source line's sequence (median; 1 = most influential)", [
        Stat("memorised: influence rank", "source_rank", ("memorised",), "median"),
        Stat("paraphrase: influence rank", "source_rank", ("paraphrase",), "median"),
        Stat("paraphrase: BM25 rank (baseline)", "source_bm25_rank", ("paraphrase",), "median"),
        Stat("paraphrase: source in top 1%", "source_top1pct", ("paraphrase",)),
    ]),
    "layers": ("3. Share of the top-k's influence in each third of the network", [
        Stat(f"{third} ({kind})", f"layer_{third}", (kind,))
        for kind in ("memorised", "paraphrase", "style", "fact_order", "crosslingual")
        for third in ("lower", "middle", "upper")
    ]),
    "order": ("4. Word order: influence of the reversed statement ÷ the forward one", [
        Stat("reversed ÷ forward (Σ over facts)", "reversed_score", ("fact_order",), "ratio", "forward_score"),
        Stat("share of facts with forward > reversed", "forward_wins", ("fact_order",)),
        Stat("forward statement: rank (median)", "forward_rank", ("fact_order",), "median"),
        Stat("reversed statement: rank (median)", "reversed_rank", ("fact_order",), "median"),
    ]),
    "crosslingual": ("5. Cross-lingual transfer: the top-10 English sequences of an English verse query, "
                     "on its Spanish translation", [
        Stat("Σ influence on Spanish ÷ on English", "transfer_ratio", ("crosslingual",)),
        Stat("their percentile among all sequences for the Spanish query", "transfer_pct", ("crosslingual",)),
        Stat("control: their percentile for the other verses' Spanish queries", "transfer_pct_control",
             ("crosslingual",)),
        Stat("reverse (top Spanish sequences on the English query): ratio", "transfer_back_ratio", ("crosslingual",)),
        Stat("reverse: percentile for the English query", "transfer_back_pct", ("crosslingual",)),
    ]),
    "semantic": ("7. Semantic source: the KJV sequence holding the verse of a WEB (modern) rendering", [
        Stat("WEB query: reciprocal rank of the source by influence (MRR)", "semantic_rr", ("semantic",)),
        Stat("WEB query: reciprocal rank by BM25 (MRR)", "semantic_bm25_rr", ("semantic",)),
        Stat("WEB query: influence MRR − BM25 MRR (paired)", "semantic_rr_minus_bm25", ("semantic",)),
        Stat("WEB query: recall@10 by influence", "semantic_recall10", ("semantic",)),
        Stat("WEB query: recall@10 by BM25", "semantic_bm25_recall10", ("semantic",)),
        Stat("WEB query: partial rank corr.(influence, source | BM25)", "semantic_partial", ("semantic",)),
        Stat("KJV control: MRR by influence", "semantic_rr", ("semantic_control",)),
        Stat("KJV control: MRR by BM25", "semantic_bm25_rr", ("semantic_control",)),
        Stat("KJV control: partial rank corr.", "semantic_partial", ("semantic_control",)),
    ]),
    "order_v2": ("4b. Word order, background-subtracted", [
        Stat("(forward − reversed) / (|forward| + |reversed|), above the mean sequence", "order_asymmetry",
             ("fact_order",)),
        Stat("reversed ÷ forward, background-subtracted (Σ over facts)", "reversed_excess", ("fact_order",), "ratio",
             "forward_excess"),
    ]),
    "canaries": ("6. Rank of the inserted text for its own query (median; 1 = top)", [
        Stat("fact stated once", "insertion_rank", ("fact_once",), "median"),
        *[Stat(f"canary x{c}, best copy", f"canary_rank_x{c}", ("canary",), "median") for c in (1, 2, 4, 16)],
        Stat("canary: share of top-c that are copies (c = copies)", "canary_precision", ("canary",)),
        Stat("canary: share of positive influence in its copies (summed)", "canary_share", ("canary",)),
        Stat("canary: rank of the summed copies (median)", "canary_sum_rank", ("canary",), "median"),
    ]),
}


def derived_fields(records: list[dict], n_train: int) -> None:
    """Fields computed from others, added in place: ``forward_wins`` (fact_order) and
    ``source_top1pct`` (whether the source ranks in the top 1% of ``n_train``) and
    ``canary_rank_x<copies>`` (a canary's best rank, by its number of copies),
    ``order_asymmetry`` (background-subtracted, :func:`experiments.stats.order_asymmetry`)
    and ``transfer_pct_excess`` (transfer percentile minus its control)."""
    for r in records:
        if "forward_score" in r:
            r["forward_wins"] = float(r["forward_score"] > r["reversed_score"])
        if "source_rank" in r:
            r["source_top1pct"] = float(r["source_rank"] <= max(1, round(0.01 * n_train)))
        if r["kind"] == "canary":
            r[f"canary_rank_x{r['copies']}"] = r["insertion_rank"]
        if "forward_excess" in r:
            r["order_asymmetry"] = order_asymmetry(r["forward_excess"], r["reversed_excess"])
        if "transfer_pct" in r and "transfer_pct_control" in r:
            r["transfer_pct_excess"] = r["transfer_pct"] - r["transfer_pct_control"]


def summarise(records: Sequence[dict], family: str, n_boot: int) -> dict[str, Estimate]:
    """Estimates of every statistic of ``family``, keyed by label."""
    return {s.label: s.of(records, n_boot) for s in FAMILIES[family][1]}
