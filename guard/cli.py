"""`siren-proxy score`: score text with a SIREN artifact, one JSON line per score.

    siren-proxy score "some text"
    siren-proxy score --prompt "How do I ..." --response "Sure, ..."
    siren-proxy score --jsonl rows.jsonl        # rows with "text", or "prompt"/"response"

torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    cmd = subparsers.add_parser("score", help="score text with the SIREN guard (one JSON line per score)")
    cmd.add_argument("text", nargs="?", help="the text to score")
    cmd.add_argument("--prompt", help="prompt (joined with --response as prompt + '\\n' + response)")
    cmd.add_argument("--response", help="response")
    cmd.add_argument("--jsonl", metavar="FILE", help="score every row of FILE ('-' for stdin)")
    cmd.add_argument("--artifact", default=None, help="artifact directory or hub id (default: embedded)")
    cmd.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto)")
    cmd.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto)")
    cmd.add_argument("--threshold", type=float, default=None, help="override the artifact's threshold")
    cmd.add_argument("--batch-size", type=int, default=16, help="rows per batch with --jsonl")
    cmd.set_defaults(func=run_score)


def _rows(args: argparse.Namespace) -> list[dict]:
    if args.jsonl is not None:
        if args.text is not None or args.prompt is not None or args.response is not None:
            raise SystemExit("score: --jsonl cannot be combined with text, --prompt or --response")
        stream = sys.stdin if args.jsonl == "-" else open(args.jsonl, encoding="utf-8")
        with stream:
            rows = []
            for n, line in enumerate(stream, 1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or not ({"text", "prompt", "response"} & row.keys()):
                        raise SystemExit(f"score: {args.jsonl}:{n}: a row needs 'text' or 'prompt'/'response'")
                    rows.append(row)
            return rows
    if args.text is not None and (args.prompt is not None or args.response is not None):
        raise SystemExit("score: pass either text or --prompt/--response, not both")
    if args.text is None and args.prompt is None and args.response is None:
        raise SystemExit("score: give a text, --prompt/--response, or --jsonl FILE")
    if args.text is not None:
        return [{"text": args.text}]
    return [{"prompt": args.prompt, "response": args.response}]


def run_score(args: argparse.Namespace) -> int:
    from guard.siren import SirenGuard
    from guard.text import model_text

    rows = _rows(args)
    guard = SirenGuard.from_pretrained(args.artifact, device=args.device, dtype=args.dtype)
    threshold = guard.threshold(args.threshold)
    for lo in range(0, len(rows), max(1, args.batch_size)):
        chunk = rows[lo : lo + args.batch_size]
        texts = [
            model_text(row["text"]) if "text" in row
            else model_text(prompt=row.get("prompt"), response=row.get("response"))
            for row in chunk
        ]
        for row, score in zip(chunk, guard.p_harmful(texts)):
            out = {k: row[k] for k in ("id",) if k in row}
            out.update(score=score, is_harmful=score >= threshold, threshold=threshold)
            print(json.dumps(out), flush=True)
    return 0
