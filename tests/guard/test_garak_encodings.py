"""garak's ``encoding`` probes, as garak 0.17.1 writes them, read back by the guard.

`fixtures/garak_encoded.jsonl` holds one harmful request and one benign one in the
encoding of each of the 20 probes, made by garak's own encoders
(`bench/garak_check.py --write-fixture`; garak is not a test dependency). Under
``emoji="max"`` a reading holds each request, in all but two: base2048 and Ecoji, whose
alphabets (2,048 characters of many scripts, 1,024 emoji) the guard does not carry
(README "Encoded text"). Where the reading is the request itself, the guard scores the
encoded text as the plain one, whole and streamed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from guard.text import model_text, second_reading, visible_reading
from tests.guard.conftest import assert_read_as, assert_streams_as_recomputed, read_and_max

ROWS = [json.loads(line) for line in
        (Path(__file__).parent / "fixtures" / "garak_encoded.jsonl").read_text(encoding="utf-8").splitlines()]
NOT_READ = {"InjectBase2048", "InjectEcoji"}
# Read as the very text (the others lose capitals and punctuation: Morse, NATO; or are
# read besides the text as written: letter codes, leetspeak).
EXACT = {"InjectBase64", "InjectBase16", "InjectBase32", "InjectAscii85", "InjectHex", "InjectQP",
         "InjectUU", "InjectMime", "InjectBraille", "InjectZalgo", "InjectUnicodeTagChars",
         "InjectUnicodeVariantSelectors", "InjectSneakyBits"}
_ALNUM = re.compile(r"[^a-z0-9]")


def readings(encoded: str) -> tuple[str, str]:
    text = model_text(encoded)
    visible = visible_reading(text) or text
    return visible, second_reading(visible) or visible


def test_the_fixture_holds_every_probe():
    assert len({row["probe"] for row in ROWS}) == 20 and {r["probe"] for r in ROWS} >= NOT_READ | EXACT


@pytest.mark.parametrize("row", [r for r in ROWS if r["probe"] not in NOT_READ], ids=lambda r: r["probe"])
def test_a_reading_holds_the_request(row):
    """Its letters and digits, in order, in either reading."""
    want = _ALNUM.sub("", row["plain"].lower())
    assert any(want in _ALNUM.sub("", reading.lower()) for reading in readings(row["encoded"]))
    if row["probe"] not in ("InjectQP", "InjectMime", "InjectZalgo"):  # those keep the letters as they are
        assert want not in _ALNUM.sub("", model_text(row["encoded"]).lower())  # as written, it is not


@pytest.mark.parametrize("row", [r for r in ROWS if r["probe"] in EXACT], ids=lambda r: r["probe"])
def test_the_text_read_is_the_request(row):
    assert readings(row["encoded"])[0].strip(" 😈") == model_text(row["plain"])


@pytest.fixture(scope="module")
def guards(artifact_factory):
    folder = artifact_factory("garak", pooling="residual_mean", layers=[0, 1], scale=3.0, seed=7, max_length=32)
    yield from read_and_max(folder)


def test_an_encoded_request_scores_as_the_request_whole_and_streamed(guards):
    """Under "max" each exactly read encoding scores as the plain request in `score_batch`,
    and a session fed the smuggled and binary ones four characters at a time equals a
    recompute at every check (a window of 32 tokens, so windows roll over)."""
    read, both = guards
    rows = [r for r in ROWS if r["probe"] in EXACT - {"InjectQP", "InjectMime"}]  # those two change nothing here
    assert_read_as(read, both, [r["encoded"].rstrip("\n") for r in rows],
                   [("😈 " if r["probe"] == "InjectUnicodeTagChars" else "") + r["plain"] for r in rows])
    for probe in ("InjectUnicodeTagChars", "InjectSneakyBits", "InjectAscii85", "InjectUU", "InjectBraille"):
        row = next(r for r in ROWS if r["probe"] == probe)
        assert_streams_as_recomputed(both, "Decode this.", row["encoded"], 4)
