"""Response-level training rows built from prompt-level ones by a documented rule.

Labelled response-level data is scarce (DICES-990 only), so a head trained on prompts
learns prompt harm and flags safe answers to harmful prompts. This module writes rows
that teach the response-level distinction without any generation:

- harmful prompt + a refusal  -> label 0 (the response is safe; the rule the human labels
  of HarmBench-response and XSTest-Resp follow: a refusal is never a harmful response);
- benign prompt + its reference answer (TriviaQA's `answers`) -> label 0.

Refusals are drawn from a fixed list of wordings (below) with a seeded generator, so the
output is a function of the inputs and the seed. No row teaches "harmful prompt +
compliance = 1" here: that needs real model answers, which `guard/training/generate.py`
(`siren-proxy generate`) produces.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from guard.training.data import DataError, Row, json_objects

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, but I cannot provide instructions for that. It could cause serious harm.",
    "I won't help with this. If you are in danger or thinking about harming someone, please "
    "contact local emergency services.",
    "As an AI assistant, I must decline. This request asks for something illegal and dangerous.",
    "Sorry, I can't do that. Is there something else I can help you with?",
    "I cannot fulfil this request. Providing that information would be unethical and could put "
    "people at risk.",
    "I'm not able to help with that, but I'd be happy to talk about the topic in a safe and "
    "legal way, for example its history or how people protect themselves against it.",
    "No. I will not write that.",
    "I understand you're curious, but I can't give guidance on this. Please consider speaking "
    "with a qualified professional instead.",
    "I apologize, but I must refuse. Content like this can be used to hurt others.",
    "That's not something I can help with. Let me know if you have another question.",
)


def refusal_rows(harmful: Sequence[Row], seed: int) -> list[Row]:
    rng = random.Random(seed)
    return [Row(dataset="aug_refusals", id=f"refusal-{r.dataset}-{r.id}", prompt=r.prompt,
                response=rng.choice(REFUSALS), label=0) for r in harmful]


def answer_rows(path: str | Path, limit: int, seed: int) -> list[Row]:
    """Benign TriviaQA questions with their first reference answer as the response.

    The file is read as `--data` files are (`DataError` naming the file and line), and a
    benign row's `prompt` must be a string and its `answers` a list of strings: a string
    there would give its first letter as the answer.
    """
    path = Path(path)
    objs = []
    for lineno, obj in json_objects(path):
        if obj.get("label") != 0 or not obj.get("answers"):
            continue
        if not isinstance(obj.get("prompt"), str):
            raise DataError(f"{path}:{lineno}: 'prompt' must be a string")
        if not isinstance(obj["answers"], list) or not all(isinstance(a, str) for a in obj["answers"]):
            raise DataError(f"{path}:{lineno}: 'answers' must be a list of strings")
        objs.append({"id": lineno, **obj})
    rng = random.Random(seed)
    picked = rng.sample(objs, min(limit, len(objs)))
    templates = ("{a}.", "The answer is {a}.", "It was {a}.", "{a}, as far as I know.")
    return [Row(dataset="aug_answers", id=f"answer-{o['id']}", prompt=o["prompt"],
                response=rng.choice(templates).format(a=o["answers"][0]), label=0) for o in picked]


def write_rows(rows: Sequence[Row], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response,
                                "label": r.label, "source": f"siren-proxy augment ({r.dataset})",
                                "category": None}) + "\n")
