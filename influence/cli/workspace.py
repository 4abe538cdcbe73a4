"""``--model DIR --data PATH`` for `influence fit|index|query`: a pretrained checkpoint
folder and a corpus, opened as a workspace folder (influence.lm.workspace) that the
command then uses as its ``--run``. The workspace is keyed by the fingerprints of the
weights and the data and by the corpus settings; its path is printed, and ``--run
WORKSPACE`` reopens it without hashing the checkpoint and the corpus again."""

from __future__ import annotations

import argparse

from influence.cli.common import fail, terminal_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options beside ``--run`` (which the caller adds without ``required=True``)."""
    group = parser.add_argument_group("a pretrained model and a corpus (instead of --run)")
    group.add_argument("--model", metavar="DIR",
                       help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) of a "
                            "GPT-2, GPT-NeoX/Pythia or Llama-family model")
    group.add_argument("--data", metavar="PATH",
                       help="training corpus: a datasets folder, .jsonl, .parquet, .csv or text files, or a folder "
                            "of them")
    group.add_argument("--text-column", default="text", help="the corpus' text column (default: text)")
    group.add_argument("--seq-len", type=int,
                       help="tokens per training sequence (default: the model's context length, at most 512)")
    group.add_argument("--truncate", action="store_true",
                       help="keep only each document's first sequence (default: cut it into overlapping windows)")
    group.add_argument("--max-documents", type=int, help="read only the first N documents of the corpus")
    group.add_argument("--workspaces", default=None, metavar="ROOT",
                       help="folder of the workspaces (default: runs/workspaces)")


def resolve(command: str, args: argparse.Namespace) -> int | None:
    """Set ``args.run`` to the workspace of ``--model``/``--data`` (made if new); ``None``
    when the command can go on, else its exit status (the error printed)."""
    from influence.errors import InfluenceError
    from influence.lm.workspace import DEFAULT_ROOT, open_workspace

    given = [o for o, v in (("--model", args.model), ("--data", args.data)) if v is not None]
    if args.run is not None:
        if given:
            return fail(command, f"give either --run or --model and --data, not both ({' '.join(given)} with --run)")
        return None
    if len(given) != 2:
        return fail(command, "give --run RUN (a training run or a workspace) or both --model DIR and --data PATH")
    try:
        args.run = open_workspace(args.model, args.data, root=args.workspaces or DEFAULT_ROOT, seq_len=args.seq_len,
                                  text_column=args.text_column, mode="truncate" if args.truncate else "window",
                                  max_documents=args.max_documents)
    except InfluenceError as e:
        return fail(command, terminal_text(e))
    print(f"workspace: {args.run} (reopen it with --run {args.run})")
    return None
