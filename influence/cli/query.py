r"""Which training sequences made the model complete a prompt this way?

Ranks every training sequence of a run by its influence on the completion's loss given
the prompt (EK-FAC, factors fitted by `influence fit`), and attributes each top
sequence's influence to its tokens and layers. Writes an HTML report and/or JSON.

examples:
  influence query --run runs/small --prompt "ROMEO:\n" --completion "But soft, what light" -k 10 --html report.html
  influence query --run runs/small --queries queries.jsonl --json results.json --query-rank 32

A queries file has one JSON object per line: {"prompt": "...", "completion": "...", "id": "..."}
(prompt and completion strings, id a string or integer and optional; other keys are refused).
Escapes like \n in --prompt/--completion are read as newlines.

The factors are those `influence fit` fitted with --strategy and --layers (and its other
settings at their defaults); when only one set of those two was fitted, with other
settings, it is used and named; --factors picks a folder of RUN/factors explicitly.
"""

from __future__ import annotations

import argparse
import time

from influence.cli import workspace
from influence.cli.common import (
    add_factor_arguments,
    check_layers,
    check_output_file,
    choose_index,
    fail,
    load_factors,
    terminal_text,
)

# Loading a run reads its tokenizer (the lm extra).
REQUIRES = ("lm", ("tokenizers",))


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", help="training run folder (from `influence train`) or a workspace (from --model "
                                       "and --data)")
    workspace.add_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt (use with --completion)")
    source.add_argument("--queries", help="JSON-lines file of queries")
    parser.add_argument("--completion", help="the completion whose probability is explained")
    parser.add_argument("-k", "--top", type=int, default=10, help="training sequences per query (default: 10)")
    add_factor_arguments(parser)
    parser.add_argument("--factors", metavar="FOLDER",
                        help="a folder of RUN/factors to use (default: the one of --strategy and --layers)")
    parser.add_argument("--damping", type=float,
                        help="absolute damping for every layer (default: 0.1 × mean eigenvalue per layer)")
    parser.add_argument("--query-rank", type=int, help="rank-r query batching (e.g. 32; default: full rank)")
    parser.add_argument("--bm25", type=int, metavar="M",
                        help="score only each query's top-M training sequences by BM25 "
                             "(faster; biased towards word overlap)")
    parser.add_argument("--no-index", action="store_true",
                        help="rescan the training set even if an index of it (`influence index`) is found")
    parser.add_argument("--html", help="write the HTML report here")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--scores", help="also write every score, float32 [queries, sequences], to this .npy file")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per step (default: chosen from the memory budget, see influence.Execution)")
    parser.add_argument("--devices", type=int, help="score the training set data-parallel over this many local devices")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _unescape(text: str) -> str:
    """Shell-friendly escapes: a typed backslash-n is a newline, backslash-t a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def print_results(results, max_chars: int = 110) -> None:
    """A table per query: rank, score, source and the start of each top sequence's text.
    Text from the data (ids, metadata, training text) is printed with its control
    characters escaped, so it cannot rewrite the terminal."""
    for r in results:
        q = r.query
        print(f"\n== {terminal_text(q.id or 'query')}: {terminal_text(repr(q.prompt))} -> "
              f"{terminal_text(repr(q.completion))}  (loss {r.loss:.2f} nats, {r.completion_tokens} tokens)")
        print(f"{'rank':>4} {'score':>10}  source | text")
        for inf in r.influences:
            meta = inf.metadata
            where = ", ".join(str(meta[k]) for k in ("title", "section") if meta.get(k)) or f"row {inf.row}"
            flag = " [concentrated]" if inf.concentrated else ""
            text = inf.text.replace("\n", " / ").strip()
            print(f"{inf.rank:>4} {inf.score:>+10.3g}  {terminal_text(where[:50])}{flag} | "
                  f"{terminal_text(text[:max_chars])}")


def run(args: argparse.Namespace) -> int:
    if (status := workspace.resolve("query", args)) is not None:  # --model/--data: args.run becomes a workspace
        return status
    from influence.lm.run import load_run
    from influence.query.engine import Query, QueryEngine, read_queries, write_json
    from influence.query.report import write_html

    if args.prompt is not None and args.completion is None:
        return fail("query", "--prompt needs --completion")
    check_layers(args.layers)
    for option, path in (("--html", args.html), ("--json", args.json), ("--scores", args.scores)):
        check_output_file(path, option)
    queries = (read_queries(args.queries) if args.queries
               else [Query(_unescape(args.prompt), _unescape(args.completion))])
    loaded = load_run(args.run)
    found = load_factors("query", args, loaded)
    if isinstance(found, int):
        return found
    path, settings, factors = found

    index, answered_by = choose_index(args, path, loaded, factors)
    engine = QueryEngine(loaded.model, loaded.tokenizer, loaded.train, factors,
                         context_length=loaded.config.context_length, damping=args.damping,
                         query_rank=args.query_rank, bm25_candidates=args.bm25, batch_size=args.batch_size,
                         progress=not args.quiet, mesh=args.devices, index=index)
    t0 = time.perf_counter()
    results = engine.run(queries, k=args.top, scores_path=args.scores)
    seconds = time.perf_counter() - t0
    print_results(results)
    info = {"run": str(args.run), "step": loaded.step, "strategy": factors.strategy,
            "layers": ", ".join(factors.layer_names), "factors": str(path),
            "weights digest": settings.get("weights_digest", "unknown"), "query rank": args.query_rank or "full",
            "BM25 prefilter": args.bm25 or "off", "answered by": answered_by,
            "training sequences": len(loaded.train),
            "seconds": round(seconds, 1)}
    print(f"\nscored {len(queries)} queries against {len(loaded.train)} sequences in {seconds:.1f} s")
    if args.json:
        print(f"json: {write_json(results, args.json, info)}")
    if args.html:
        print(f"report: {write_html(results, args.html, info)}")
    return 0
