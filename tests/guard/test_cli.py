"""`siren-proxy score` through the lead's parser: prints what SirenGuard computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_score_refuses_ambiguous_input(artifact, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "text", "--prompt", "p", "--artifact", str(artifact)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "siren-proxy score: pass either text or --prompt/--response, not both\n"


@pytest.mark.parametrize(("second", "problem"), [
    (b"{not json}", "not valid JSON: Expecting property name enclosed in double quotes (column 2)"),
    (b'{"text": "caf\xe9"}', "not valid UTF-8"),
    (b'["text"]', "a row needs 'text' or 'prompt'/'response'"),
    (b'{"text": 5}', "'text' must be a string"),
    (b'{"prompt": null, "response": null}', "'text' must be a string"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
])
def test_score_jsonl_bad_line_is_one_line_naming_file_and_line(tmp_path, capsys, second, problem):
    """Checked before the artifact loads (it does not exist here): exit 2, no traceback."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(b'{"text": "fine"}\n' + second + b"\n" + b'{"text": "after"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--jsonl", str(rows), "--artifact", str(tmp_path / "absent")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"siren-proxy score: {rows}:2: {problem}") and err.count("\n") == 1, err


def test_score_jsonl_missing_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--jsonl", str(missing)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"siren-proxy score: {missing}: cannot read: No such file or directory\n"


def test_score_jsonl_errors_reach_the_shell_without_a_traceback(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\nnot json\n')
    result = subprocess.run([sys.executable, "-m", "proxy", "score", "--jsonl", str(rows)],
                            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert result.returncode == 2
    assert result.stderr.startswith(f"siren-proxy score: {rows}:2: not valid JSON") and "Traceback" not in result.stderr


@pytest.mark.parametrize("value", ["2", "-0.1", "1.5", "nan", "inf", "high"])
def test_score_threshold_outside_0_1_is_a_usage_error(artifact, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "hello", "--artifact", str(artifact), "--device", "cpu", "--threshold", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --threshold: must be" in err and "[0, 1]" in err


@pytest.mark.parametrize("value", ["0", "1", "0.25"])
def test_score_threshold_bounds_are_accepted(artifact, capsys, value):
    common = ["--artifact", str(artifact), "--device", "cpu", "--dtype", "float32"]
    assert main(["score", "hello", *common, "--threshold", value]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == float(value)


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_train_refuses_an_ensemble_that_is_not_a_positive_count(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "rows.jsonl", "--out", "head", "--ensemble", value])
    assert exit_info.value.code == 2
    assert "--ensemble" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_score_batch_size_must_be_a_positive_count(tmp_path, capsys, value):
    """A batch size of 0 printed nothing and exited 0; -1 silently dropped rows."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--jsonl", str(rows), "--artifact", str(tmp_path / "absent"), "--batch-size", value])
    assert exit_info.value.code == 2
    assert "argument --batch-size: " in capsys.readouterr().err


@pytest.mark.parametrize("option, value, problem", [
    ("--artifact", "absent", "does not exist"),
    ("--artifact", "", "is not a local directory"),  # taken for a hub id, which it cannot be
    ("--device", "tpu", "unknown device 'tpu'"),
    ("--dtype", "int8", "unknown dtype 'int8'"),
])
def test_score_reports_what_cannot_load_in_one_line(artifact, tmp_path, capsys, option, value, problem):
    options = {"--artifact": str(artifact), "--device": "cpu", "--dtype": "float32"}
    options[option] = str(tmp_path / value) if value == "absent" else value
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "hello", *[part for item in options.items() for part in item]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("siren-proxy score: ") and problem in err and err.count("\n") == 1


BAD_DATA = {  # file content -> what the one line says; each is refused before any model loads
    None: "cannot read",
    b'{"prompt": "hi", "label": 0}\nnot json\n': ":2: not valid JSON",
    b'{"prompt": "\xff", "label": 0}\n': ":1: not valid UTF-8",
    b'["hi", 0]\n': ":1: a row must be a JSON object",
    b'{"prompt": "hi"}\n': ":1: label must be 0 or 1",
    b'{"prompt": "hi", "label": true}\n': ":1: label must be 0 or 1, got True",  # was read as 1
    b'{"prompt": 5, "label": 1}\n': ":1: 'prompt' must be a string",
    b'{"prompt": "hi", "response": ["a"], "label": 1}\n': ":1: 'response' must be a string or null",
}


@pytest.mark.parametrize("command", ["train", "eval", "generate", "generate --agreement"])
@pytest.mark.parametrize("content", list(BAD_DATA), ids=range(len(BAD_DATA)))
def test_train_eval_and_generate_report_a_bad_data_file_in_one_line(tmp_path, capsys, command, content):
    rows = tmp_path / "rows.jsonl"
    if content is not None:
        rows.write_bytes(content)
    args = {"train": ["--data", str(rows), "--out", str(tmp_path / "head")],
            "eval": ["--data", str(rows), "--no-baseline"],
            "generate": ["--prompts", str(rows), "--out", str(tmp_path / "out.jsonl"), "--upstream", "http://x"],
            "generate --agreement": ["--agreement", str(rows), "--prompt-labels", str(rows)]}[command]
    command = command.split()[0]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"siren-proxy {command}: {rows}") and BAD_DATA[content] in err and err.count("\n") == 1


def test_eval_reports_an_artifact_that_cannot_load_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", "rows.jsonl", "--artifact", str(tmp_path), "--no-baseline"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("siren-proxy eval: ") and "siren_config.json does not exist" in err


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan", "some"])
def test_train_val_fraction_must_be_between_0_and_1(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "rows.jsonl", "--out", "head", "--val-fraction", value])
    assert exit_info.value.code == 2
    assert "argument --val-fraction: " in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_is_one_line_before_any_conversion(tmp_path, monkeypatch, capsys):
    """The GGUF backbone is converted into `SIREN_PROXY_CACHE` on first use. A cache that
    cannot be written (a read-only home, a file in the way) was a NotADirectoryError or
    PermissionError traceback, and only after the conversion's 20 s."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SIREN_PROXY_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "hello", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("siren-proxy score: cannot write the converted backbone under ")
    assert "SIREN_PROXY_CACHE" in err and err.count("\n") == 1


def test_a_transformers_too_old_to_convert_the_gguf_is_one_line(tmp_path, monkeypatch, capsys):
    """transformers before 5.18 converted SmolLM2's byte-level tokenizer with an unknown
    token and byte fallback (seen on a GPU machine's 5.17): texts with bytes outside the
    vocabulary were tokenised as the head never was. The conversion refuses such a version."""
    import transformers

    monkeypatch.setenv("SIREN_PROXY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "hello", "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("siren-proxy score: converting SmolLM2-135M-Instruct.Q4_1.gguf needs transformers>=5.18 "
                          "(installed: 5.17.0)")
    assert err.count("\n") == 1 and not (tmp_path / "cache" / "backbones").exists()


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
@pytest.mark.parametrize("content, spec_suffix", [(b"", ""), (b"\n  \n", ""), (b'{"prompt": "hi", "label": 0}\n', ":0")])
def test_a_data_spec_with_no_rows_is_one_line(tmp_path, capsys, command, content, spec_suffix):
    """An empty file (or FILE:0) gave a numpy traceback after the backbone had loaded."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(content)
    spec = f"{rows}{spec_suffix}"
    args = {"train": ["--data", spec, "--out", str(tmp_path / "head")],
            "eval": ["--data", spec, "--no-baseline"],
            "generate": ["--prompts", spec, "--out", str(tmp_path / "out.jsonl"), "--upstream", "http://x"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"siren-proxy {command}: {spec}: no rows\n"


def _rows(labels: list[int]) -> bytes:
    return "".join(json.dumps({"prompt": f"prompt number {i}", "label": y}) + "\n"
                   for i, y in enumerate(labels)).encode()


@pytest.mark.parametrize("labels, problem", [
    ([1] * 40, "the data has 40 rows, all harmful: a head needs harmful and benign rows"),
    ([0] * 40, "the data has 40 rows, all benign: a head needs harmful and benign rows"),
    ([1, 0, 1, 0], "the validation split has 0 rows"),
    ([1] * 20 + [0] * 3, "the validation split has 3 rows, all harmful"),
])
def test_train_refuses_data_that_cannot_give_both_labels_on_both_sides(tmp_path, capsys, labels, problem):
    """One label only (or a split that leaves one) was a scikit-learn traceback after
    feature extraction, whose message spoke of 'n_classes >= 3'."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(_rows(labels))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(rows), "--out", str(tmp_path / "head")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"siren-proxy train: {problem}") and err.count("\n") == 1
    assert not (tmp_path / "head").exists()


def test_train_says_when_exclude_leaves_no_rows(tmp_path, capsys):
    """It said 'the data has 0 rows, all benign'."""
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(_rows([1, 0] * 3))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(rows), "--exclude", str(rows), "--out", str(tmp_path / "head")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "siren-proxy train: no rows are left: all 6 have the prompt of an --exclude file\n"


@pytest.mark.parametrize("command, option, value", [
    ("train", "--layers", "0"), ("train", "--layers", "-2"), ("train", "--neurons", "0"),
    ("train", "--max-length", "0"), ("train", "--extract-layers", "0"), ("train", "--refusals", "-1"),
    ("train", "--emoji", "-1"),
    ("train", "--probe-c", "0"), ("train", "--probe-c", "-1"), ("train", "--probe-c", "nan"),
    ("generate", "--batch-size", "0"), ("generate", "--concurrency", "0"), ("generate", "--max-tokens", "0"),
    ("generate", "--temperature", "-1"),
])
def test_train_and_generate_refuse_counts_and_strengths_out_of_range(capsys, command, option, value):
    """Each was taken: --layers -2 kept all but two layers, --refusals -1 all harmful
    prompts but one, --extract-layers 0 every block; --neurons 0, --max-length 0 and
    --probe-c 0 failed with a traceback after feature extraction."""
    required = {"train": ["--data", "rows.jsonl", "--out", "head"],
                "generate": ["--prompts", "rows.jsonl", "--out", "out.jsonl"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *required, option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: " in capsys.readouterr().err


@pytest.mark.parametrize("command, option, make, problem", [
    ("train", "--out", "file", "is a file, not a directory"),
    ("train", "--out", "under-file", "is not a directory"),
    ("eval", "--report", "under-file", "is not a directory"),
    ("eval", "--report", "dir", "is a directory"),
    ("eval", "--plot", "under-file", "is not a directory"),
    ("generate", "--out", "dir", "is a directory"),
])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, command, option, make, problem):
    """Each raised a traceback at the very end, after the features, the fit or the scores
    had been computed (an hour for the shipped head), and the result was lost."""
    blocker = tmp_path / "blocker"
    if make == "dir":
        blocker.mkdir()
        target = blocker
    else:
        blocker.write_text("")
        target = blocker if make == "file" else blocker / "sub" / "out"
    args = {"train": ["--data", "rows.jsonl"], "eval": ["--data", "rows.jsonl", "--no-baseline"],
            "generate": ["--prompts", "rows.jsonl", "--upstream", "http://x"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args, option, str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"siren-proxy {command}: {option} {target}: ") and problem in err and err.count("\n") == 1


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read"),
    (b'{"prompt": "q", "answers": ["a"], "label": 0}\nnot json\n', ":2: not valid JSON"),
    (b'{"prompt": "\xff", "answers": ["a"], "label": 0}\n', ":1: not valid UTF-8"),
    (b'{"prompt": "q", "answers": "Paris", "label": 0}\n', ":1: 'answers' must be a list of strings"),
    (b'{"answers": ["a"], "label": 0}\n', ":1: 'prompt' must be a string"),
])
def test_train_reports_a_bad_answers_file_in_one_line(tmp_path, capsys, content, problem):
    """--answers read its file on its own: a missing or broken one was a traceback, and
    `answers` given as a string trained on its first letter ("P.")."""
    data = tmp_path / "rows.jsonl"
    data.write_bytes(_rows([1, 0] * 20))
    answers = tmp_path / "trivia.jsonl"
    if content is not None:
        answers.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(data), "--answers", f"{answers}:5", "--out", str(tmp_path / "head")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"siren-proxy train: {answers}") and problem in err and err.count("\n") == 1


@pytest.mark.parametrize("option", ["--data", "--pairs"])
@pytest.mark.parametrize("second", ["other/rows.jsonl", "rows.jsonl:3:1"])
def test_eval_refuses_two_data_specs_of_one_dataset_name(artifact, tmp_path, capsys, option, second):
    """The report is keyed by file name: the second spec replaced the first, whose rows
    were then silently left out of the report."""
    (tmp_path / "other").mkdir()
    pair = {"context": "Human: hi", "first_human_turn": "hi", "chosen_response": "a", "rejected_response": "b"}
    for path in (tmp_path / "rows.jsonl", tmp_path / "other" / "rows.jsonl"):
        path.write_bytes(_rows([1, 0] * 5) if option == "--data" else (json.dumps(pair) + "\n").encode())
    data = [] if option == "--data" else ["--data", str(tmp_path / "data.jsonl")]
    (tmp_path / "data.jsonl").write_bytes(_rows([1, 0]))
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *data, option, str(tmp_path / "rows.jsonl"), str(tmp_path / second), "--no-baseline",
              "--artifact", str(artifact)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"siren-proxy eval: {tmp_path / second}: a second {option} spec of the dataset 'rows' "
                   "(the report names a set by its file name)\n")
