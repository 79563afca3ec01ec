"""Response-level training rows built from prompt-level ones by a documented rule.

Labelled response-level data is scarce (DICES-990 only), so a head trained on prompts
learns prompt harm and flags safe answers to harmful prompts. This module writes rows
that teach the response-level distinction without any generation:

- harmful prompt + a refusal  -> label 0 (the response is safe; the rule the human labels
  of HarmBench-response and XSTest-Resp follow: a refusal is never a harmful response);
- benign prompt + its reference answer (TriviaQA's `answers`) -> label 0;
- a row of either label with emoji written into it (its response, or its prompt when it
  has none) -> the same label (`emoji_rows`). A head trained without such rows read
  emoji sequences it had never seen (zero-width-joined families and flags) as harm:
  "Happy pride month" + the rainbow flag scored 0.78. Rows of both labels are written,
  so emoji carry no label: a harmful request with emoji in it is still harmful.

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


# Emoji written into training rows: zero-width-joined sequences (families, professions,
# flags), skin-tone modifiers, regional-indicator and tag flags, keycaps, variation
# selectors, plain emoji. bench/emoji_check.py scores development sets with *other* emoji
# (the rainbow flag and the four-person family among them), so what it measures is
# generalisation, not these strings.
EMOJI = (
    "\U0001F3F3\uFE0F\u200D\u26A7\uFE0F",  # transgender flag
    "\U0001F468\u200D\U0001F469\u200D\U0001F467",  # family: man, woman, girl
    "\U0001F469\u200D\U0001F469\u200D\U0001F466",  # family: woman, woman, boy
    "\U0001F468\u200D\U0001F468\u200D\U0001F467\u200D\U0001F466",  # family: man, man, girl, boy
    "\U0001F469\u200D\u2764\uFE0F\u200D\U0001F468",  # couple with heart
    "\U0001F468\u200D\u2764\uFE0F\u200D\U0001F468",  # couple with heart: man, man
    "\U0001F9D1\u200D\U0001F91D\u200D\U0001F9D1",  # people holding hands
    "\U0001F469\u200D\U0001F4BB",  # woman technologist
    "\U0001F9D1\u200D\U0001F373",  # cook
    "\U0001F468\u200D\U0001F52C",  # man scientist
    "\U0001F469\u200D\U0001F393",  # woman student
    "\U0001F468\u200D\u2695\uFE0F",  # man health worker
    "\U0001F9D1\u200D\U0001F680",  # astronaut
    "\U0001F469\u200D\U0001F33E",  # woman farmer
    "\U0001F415\u200D\U0001F9BA",  # service dog
    "\U0001F43B\u200D\u2744\uFE0F",  # polar bear
    "\u2764\uFE0F\u200D\U0001F525",  # heart on fire
    "\U0001F636\u200D\U0001F32B\uFE0F",  # face in clouds
    "\U0001F3C3\u200D\u2640\uFE0F",  # woman running
    "\U0001F937\u200D\u2642\uFE0F",  # man shrugging
    "\U0001F64B\u200D\u2640\uFE0F",  # woman raising hand
    "\U0001F9D1\U0001F3FE\u200D\U0001F4BB",  # technologist, medium-dark skin tone
    "\U0001F44D\U0001F3FB", "\U0001F44B\U0001F3FE", "\U0001F64F\U0001F3FD",  # skin tones
    "\U0001F4AA\U0001F3FF", "\U0001F44F\U0001F3FC", "\U0001F91D\U0001F3FD",
    "\U0001F1EC\U0001F1E7", "\U0001F1EF\U0001F1F5", "\U0001F1E7\U0001F1F7",  # flags
    "\U0001F1EE\U0001F1F3", "\U0001F1FA\U0001F1E6",
    "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F",  # Scotland
    "1\uFE0F\u20E3", "#\uFE0F\u20E3", "\U0001F51F",  # keycaps
    "\u2764\uFE0F", "\u2600\uFE0F", "\u2714\uFE0F", "\u260E\uFE0F",  # variation selectors
    "\U0001F602", "\U0001F970", "\U0001F389", "\U0001F525", "\U0001F62D", "\U0001F914",
    "\u2728", "\U0001F64C", "\U0001F605", "\U0001F30D", "\U0001F382", "\U0001F431",
)


def with_emoji(text: str, rng: random.Random, emoji: Sequence[str] = EMOJI) -> str:
    """`text` with one to three of `emoji` written at its end (half the time), its start,
    or after one of its words."""
    run = "".join(rng.choice(emoji) for _ in range(rng.randint(1, 3)))
    where = rng.random()
    if where < 0.5:
        return text + rng.choice((" ", "", "! ")) + run
    if where < 0.7:
        return run + " " + text
    words = text.split(" ")
    at = rng.randint(1, len(words))
    return " ".join(words[:at] + [run] + words[at:])


def emoji_rows(rows: Sequence[Row], seed: int, emoji: Sequence[str] = EMOJI) -> list[Row]:
    """Each row again with emoji written into its response (or its prompt, when it has
    no response), same label. The normalised prompt folds emoji away, so an emoji row
    splits with its source row and is dropped with it if its prompt is an evaluation one."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        if r.response is None:
            prompt, response = with_emoji(r.prompt, rng, emoji), None
        else:
            prompt, response = r.prompt, with_emoji(r.response, rng, emoji)
        out.append(Row(dataset="aug_emoji", id=f"emoji-{r.dataset}-{r.id}", prompt=prompt,
                       response=response, label=r.label))
    return out


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
