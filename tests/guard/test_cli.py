"""`siren-proxy score` through the lead's parser: prints what SirenGuard computes."""

from __future__ import annotations

import json

import pytest
import torch

from guard import SirenGuard
from proxy.cli import main


@pytest.fixture(scope="module")
def artifact(artifact_factory):
    return artifact_factory("cli", pooling="mlp_mean", layers=[1, 2], scale=3.0, max_length=64)


def test_score_text_prompt_response_and_jsonl(artifact, tmp_path, capsys):
    guard = SirenGuard.from_pretrained(artifact, device="cpu", dtype=torch.float32)
    common = ["--artifact", str(artifact), "--device", "cpu", "--dtype", "float32"]

    assert main(["score", "hello there", *common, "--threshold", "0.1"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["score"] == pytest.approx(guard.score("hello there").score, abs=1e-5)
    assert line["threshold"] == 0.1 and line["is_harmful"] == (line["score"] >= 0.1)

    assert main(["score", "--prompt", "p?", "--response", "r.", *common]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["score"] == pytest.approx(guard.score(prompt="p?", response="r.").score, abs=1e-5)

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "text": "one"}) + "\n"
                    + json.dumps({"id": "b", "prompt": "two", "response": "three"}) + "\n")
    assert main(["score", "--jsonl", str(rows), *common]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["id"] for x in lines] == ["a", "b"]
    assert lines[1]["score"] == pytest.approx(guard.score(prompt="two", response="three").score, abs=1e-5)


def test_score_refuses_ambiguous_input(artifact):
    with pytest.raises(SystemExit):
        main(["score", "text", "--prompt", "p", "--artifact", str(artifact)])


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_train_refuses_an_ensemble_that_is_not_a_positive_count(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "rows.jsonl", "--out", "head", "--ensemble", value])
    assert exit_info.value.code == 2
    assert "--ensemble" in capsys.readouterr().err
