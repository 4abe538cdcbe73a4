"""Text queries over a trained language-model run: from a prompt and a completion to
ranked, attributed training sequences, a BM25 prefilter, and an HTML report.

    engine = inf.query.QueryEngine(model, tokenizer, train, factors, context_length=128)
    results = engine.run([inf.query.Query("ROMEO:\\n", "But soft, what light")], k=10)
    inf.query.write_html(results, "report.html")
"""

from influence.query.bm25 import BM25
from influence.query.engine import Query, QueryEngine, QueryResult, TrainingInfluence, read_queries, write_json
from influence.query.report import write_html

__all__ = ["BM25", "Query", "QueryEngine", "QueryResult", "TrainingInfluence", "read_queries", "write_html",
           "write_json"]
