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
from collections.abc import Callable
from typing import NoReturn


def register(subparsers) -> None:
    cmd = subparsers.add_parser("score", help="score text with the SIREN guard (one JSON line per score)")
    cmd.add_argument("text", nargs="?", help="the text to score")
    cmd.add_argument("--prompt", help="prompt (joined with --response as prompt + '\\n' + response)")
    cmd.add_argument("--response", help="response")
    cmd.add_argument("--jsonl", metavar="FILE", help="score every row of FILE ('-' for stdin)")
    cmd.add_argument("--artifact", default=None, help="artifact directory or hub id (default: embedded)")
    cmd.add_argument("--device", default=None, help="cpu, cuda or auto (default: auto)")
    cmd.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto)")
    cmd.add_argument("--threshold", type=_unit_interval, default=None,
                     help="override the artifact's threshold (a number in [0, 1])")
    cmd.add_argument("--batch-size", type=positive_int, default=16, help="rows per batch with --jsonl (default: 16)")
    cmd.set_defaults(func=run_score)


def _unit_interval(value: str) -> float:
    """A threshold as the config takes one: a finite number in [0, 1] (nan is not)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def whole_number(lowest: int, highest: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `lowest` (and at most `highest`). A
    batch size of 0 would score nothing, a negative count slices from the end (`--layers
    -2` kept all but two), and the socket layer reads a port over 65535 modulo 65536."""
    wanted = f"a whole number of at least {lowest}" if highest is None else f"a number in {lowest}-{highest}"
    bound = f"at least {lowest}" if highest is None else wanted

    def whole(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value!r}") from None
        if number < lowest or (highest is not None and number > highest):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {number}")
        return number

    return whole


positive_int = whole_number(1)  # `siren-proxy score`, `train`, `eval` and `generate` counts


def _fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit status 2 (argparse's, and `check-config`'s),
    never a traceback."""
    print(f"siren-proxy score: {message}", file=sys.stderr)
    raise SystemExit(2)


def _rows(args: argparse.Namespace) -> list[dict]:
    if args.jsonl is not None:
        if args.text is not None or args.prompt is not None or args.response is not None:
            _fail("--jsonl cannot be combined with text, --prompt or --response")
        return _read_jsonl(args.jsonl)
    if args.text is not None and (args.prompt is not None or args.response is not None):
        _fail("pass either text or --prompt/--response, not both")
    if args.text is None and args.prompt is None and args.response is None:
        _fail("give a text, --prompt/--response, or --jsonl FILE")
    if args.text is not None:
        return [{"text": args.text}]
    return [{"prompt": args.prompt, "response": args.response}]


def _read_jsonl(name: str) -> list[dict]:
    """Every row of `name` ('-': stdin), each checked before any is scored. Lines are
    decoded one at a time, so an error names the line it is on (a text stream decodes
    ahead, in blocks)."""
    try:
        stream = sys.stdin.buffer if name == "-" else open(name, "rb")
    except OSError as exc:
        _fail(f"{name}: cannot read: {exc.strerror or exc}")
    rows = []
    with stream:
        for n, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except UnicodeDecodeError:
                _fail(f"{name}:{n}: not valid UTF-8")
            except json.JSONDecodeError as exc:
                _fail(f"{name}:{n}: not valid JSON: {exc.msg} (column {exc.colno})")
            except (ValueError, RecursionError):
                _fail(f"{name}:{n}: not valid JSON")
            if not isinstance(row, dict) or not ({"text", "prompt", "response"} & row.keys()):
                _fail(f"{name}:{n}: a row needs 'text' or 'prompt'/'response'")
            if not _row_texts_ok(row):
                _fail(f"{name}:{n}: 'text' must be a string; 'prompt' and 'response' strings or null, "
                      "at least one a string")
            rows.append(row)
    return rows


def _row_texts_ok(row: dict) -> bool:
    if "text" in row:
        return isinstance(row["text"], str)
    texts = [row.get("prompt"), row.get("response")]
    return all(t is None or isinstance(t, str) for t in texts) and any(isinstance(t, str) for t in texts)


def run_score(args: argparse.Namespace) -> int:
    from guard.errors import ArtifactError, BackboneError
    from guard.result import ScoreResult
    from guard.siren import SirenGuard
    from guard.text import model_text

    rows = _rows(args)
    try:
        guard = SirenGuard.from_pretrained(args.artifact, device=args.device, dtype=args.dtype)
    except (ArtifactError, BackboneError) as exc:  # a bad --artifact, --device or --dtype
        _fail(" ".join(str(exc).split()))
    threshold = guard.threshold(args.threshold)
    for lo in range(0, len(rows), args.batch_size):
        chunk = rows[lo : lo + args.batch_size]
        texts = [
            model_text(row["text"]) if "text" in row
            else model_text(prompt=row.get("prompt"), response=row.get("response"))
            for row in chunk
        ]
        for row, score in zip(chunk, guard.p_harmful(texts)):
            out = {k: row[k] for k in ("id",) if k in row}
            out.update(ScoreResult.of(score, threshold).to_dict())
            print(json.dumps(out), flush=True)
    return 0
