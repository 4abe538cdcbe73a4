"""Which training sequences made the model complete a prompt this way?

Ranks every training sequence of a run by its influence on the completion's loss given
the prompt (EK-FAC, factors fitted by `influence fit`), and attributes each top
sequence's influence to its tokens and layers. Writes an HTML report and/or JSON.

examples:
  influence query --run runs/small --prompt "ROMEO:\n" --completion "But soft, what light" -k 10 --html report.html
  influence query --run runs/small --queries queries.jsonl --json results.json --query-rank 32

A queries file has one JSON object per line: {"prompt": "...", "completion": "...", "id": "..."}.
Escapes like \n in --prompt/--completion are read as newlines.
"""

from __future__ import annotations

import argparse
import time

from influence.cli.common import add_factor_arguments, fail, fit_command

# Loading a run reads its tokenizer (the lm extra).
REQUIRES = ("lm", ("tokenizers",))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="training run folder (from `influence train`)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt (use with --completion)")
    source.add_argument("--queries", help="JSON-lines file of queries")
    parser.add_argument("--completion", help="the completion whose probability is explained")
    parser.add_argument("-k", "--top", type=int, default=10, help="training sequences per query (default: 10)")
    add_factor_arguments(parser)
    parser.add_argument("--damping", type=float, help="absolute damping for every layer (default: 0.1 × mean eigenvalue per layer)")
    parser.add_argument("--query-rank", type=int, help="rank-r query batching (e.g. 32; default: full rank)")
    parser.add_argument("--bm25", type=int, metavar="M",
                        help="score only each query's top-M training sequences by BM25 (faster; biased towards word overlap)")
    parser.add_argument("--html", help="write the HTML report here")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--scores", help="also write every score, float32 [queries, sequences], to this .npy file")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step (default: 32)")
    parser.add_argument("--devices", type=int, help="score the training set data-parallel over this many local devices")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _unescape(text: str) -> str:
    """Shell-friendly escapes: a typed backslash-n is a newline, backslash-t a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def print_results(results, max_chars: int = 110) -> None:
    """A table per query: rank, score, source and the start of each top sequence's text."""
    for r in results:
        q = r.query
        print(f"\n== {q.id or 'query'}: {q.prompt!r} -> {q.completion!r}  (loss {r.loss:.2f} nats, "
              f"{r.completion_tokens} tokens)")
        print(f"{'rank':>4} {'score':>10}  source | text")
        for inf in r.influences:
            meta = inf.metadata
            where = ", ".join(str(meta[k]) for k in ("title", "section") if meta.get(k)) or f"row {inf.row}"
            flag = " [concentrated]" if inf.concentrated else ""
            text = inf.text.replace("\n", " / ").strip()
            print(f"{inf.rank:>4} {inf.score:>+10.3g}  {where[:50]}{flag} | {text[:max_chars]}")


def run(args: argparse.Namespace) -> int:
    from influence.errors import FileFormatError
    from influence.factors import Factors
    from influence.lm.run import load_run
    from influence.query.engine import Query, QueryEngine, read_queries, write_json
    from influence.query.report import write_html

    if args.prompt is not None and args.completion is None:
        return fail("query", "--prompt needs --completion")
    try:
        queries = (read_queries(args.queries) if args.queries
                   else [Query(_unescape(args.prompt), _unescape(args.completion))])
        loaded = load_run(args.run)
    except (FileNotFoundError, ValueError) as e:
        return fail("query", str(e))
    path = loaded.factors_dir(args.strategy, args.layers)
    try:
        factors = Factors.load(path, model=loaded.model)
    except FileFormatError as e:
        if not (path / "factors.npz").exists():
            return fail("query", f"no {args.strategy} factors for layers '{args.layers}' in {args.run}; fit them "
                                 f"first with:\n  {fit_command(args.run, args.strategy, args.layers)}")
        return fail("query", str(e))
    except ValueError as e:
        return fail("query", f"{e}; refit with:\n  {fit_command(args.run, args.strategy, args.layers)} --force")
    engine = QueryEngine(loaded.model, loaded.tokenizer, loaded.train, factors,
                         context_length=loaded.config.context_length, damping=args.damping,
                         query_rank=args.query_rank, bm25_candidates=args.bm25, batch_size=args.batch_size,
                         progress=not args.quiet, mesh=args.devices)
    t0 = time.perf_counter()
    try:
        results = engine.run(queries, k=args.top, scores_path=args.scores)
    except ValueError as e:
        return fail("query", str(e))
    seconds = time.perf_counter() - t0
    print_results(results)
    info = {"run": str(args.run), "step": loaded.step, "strategy": factors.strategy,
            "layers": ", ".join(factors.layer_names), "query rank": args.query_rank or "full",
            "BM25 prefilter": args.bm25 or "off", "training sequences": len(loaded.train),
            "seconds": round(seconds, 1)}
    print(f"\nscored {len(queries)} queries against {len(loaded.train)} sequences in {seconds:.1f} s")
    if args.json:
        print(f"json: {write_json(results, args.json, info)}")
    if args.html:
        print(f"report: {write_html(results, args.html, info)}")
    return 0
