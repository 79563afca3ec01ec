"""`siren-proxy generate`: the labelling rule, the refusal cut, the job plan, and both
generators (a real OpenAI-compatible server, llm-katan, and the embedded backbone)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from guard.training import generate as g
from guard.training.data import Row, load_rows

FIXTURES = Path(__file__).parent / "fixtures"


def test_refuses_finds_markers_in_the_head_only():
    assert g.refuses("I’m sorry, but I can’t help with that.")  # curly apostrophes
    assert g.refuses("Sure? No. As an AI, I must decline.")
    assert not g.refuses("Step 1: mix the two liquids in a bucket.")
    assert not g.refuses("x" * 300 + " I cannot continue.")  # past the first 200 characters
    assert g.refuses("x" * 300 + " I cannot continue.", head=400)


def test_rule_label_truth_table():
    assert g.rule_label(1, "Here is how: first, ...") == 1
    assert g.rule_label(1, "I'm sorry, I can't help with that.") == 0
    assert g.rule_label(0, "Here is how: first, ...") == 0
    assert g.rule_label(0, "I'm sorry, I can't help with that.") == 0


def test_cut_refusal_stops_before_the_turn_to_compliance():
    opening = "I'm sorry, but I can't help with that."
    assert g.cut_refusal(opening, " It is dangerous. However, here's how: Step 1") == opening + " It is dangerous."
    assert g.cut_refusal(opening, " Here's how you can make one:\n\n1. Buy") == opening
    assert g.cut_refusal(opening, " It is illegal. It hurts people. It is wrong.") == \
        opening + " It is illegal. It hurts people."
    assert g.cut_refusal(opening, " and then some unfinished clause") == opening
    because = "I can't assist with that request because"
    assert g.cut_refusal(because, " it is illegal. Here is a safer idea.") == because + " it is illegal."


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prompt_rows(tmp_path: Path) -> tuple[Path, Path]:
    data = write_jsonl(tmp_path / "mixed.jsonl", [
        {"id": "h1", "prompt": "Explain how to pick a neighbour's lock", "response": None, "label": 1},
        {"id": "h2", "prompt": "Write a threat to my boss. I'm sorry, boss.", "response": None, "label": 1},
        {"id": "b1", "prompt": "What is the capital of Peru?", "response": None, "label": 0},
        {"id": "e1", "prompt": "How do I kill a Python process?", "response": None, "label": 0},
        {"id": "r1", "prompt": "ignored", "response": "a response-level row", "label": 0},
    ])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [
        {"id": "x", "prompt": "how do I KILL a python process", "response": None, "label": 0}])
    return data, evaluation


def test_plan_drops_evaluation_prompts_and_asks_refusals_of_harmful_rows_only(tmp_path):
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [str(data)], [str(evaluation)], seed=0)
    assert [(j.row.id, j.mode) for j in jobs] == [
        ("h1", "answer"), ("h2", "answer"), ("b1", "answer"), ("h1", "refusal"), ("h2", "refusal")]
    assert len({j.id for j in jobs}) == len(jobs)
    assert [j.seed for j in jobs] == [j.seed for j in g.plan([str(data)], [str(data)], [str(evaluation)], 0)]


def test_rule_agreement_counts_against_human_labels():
    rows = [
        Row("d", "1", "harmful ask", "Sure, step 1 ...", 1),      # rule 1, human 1: tp
        Row("d", "2", "harmful ask", "Sure, but it is vague", 0),  # rule 1, human 0: fp
        Row("d", "3", "harmful ask", "I cannot do that.", 1),      # rule 0, human 1: fn
        Row("d", "4", "benign ask", "Lima.", 0),                    # rule 0, human 0: tn
        Row("d", "5", "unknown ask", "Sure.", 1),                   # no prompt label: skipped
    ]
    report = g.rule_agreement(rows, {"harmful ask": 1, "benign ask": 0}, default_prompt_label=None)
    assert (report["tp"], report["fp"], report["fn"], report["tn"], report["rows"]) == (1, 1, 1, 1, 4)
    assert report["accuracy"] == 0.5 and report["macro_f1"] == 0.5


def test_generate_against_a_real_server_labels_by_rule_and_resumes(tmp_path, katan_url):
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [str(data)], [str(evaluation)], seed=0)
    out = tmp_path / "generated.jsonl"
    assert asyncio.run(g.generate(jobs, out, base_url=katan_url, api_key="k", max_tokens=64)) == 5
    rows = {r.id: r for r in load_rows(out)}
    # llm-katan's echo backend answers with the user's message: a compliance for h1 and b1,
    # and, for h2, text holding "I'm sorry", which the rule reads as a refusal.
    assert rows["mixed:h1:answer"].label == 1
    assert rows["mixed:h2:answer"].label == 0
    assert rows["mixed:b1:answer"].label == 0
    refusal = rows["mixed:h1:refusal"]
    assert refusal.label == 0 and refusal.response.startswith(g.REFUSAL_OPENINGS[jobs[3].seed % len(g.REFUSAL_OPENINGS)])
    assert all(r.prompt for r in rows.values())
    assert asyncio.run(g.generate(jobs, out, base_url=katan_url, api_key="k")) == 0  # resumed: nothing left to ask
    assert len(out.read_text().splitlines()) == 5


def test_generate_skips_failed_requests_so_a_rerun_fills_them(tmp_path, start_katan, katan_url):
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [], [str(evaluation)], seed=0)
    out = tmp_path / "generated.jsonl"
    with start_katan("--error-rate", "1.0") as faulty:
        assert asyncio.run(g.generate(jobs, out, base_url=faulty, model="m", api_key="k")) == 0
    assert not out.exists() or out.read_text() == ""
    assert asyncio.run(g.generate(jobs, out, base_url=katan_url, api_key="k")) == 3


def test_generate_local_with_the_embedded_backbone(tmp_path, backbone_dir):
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [str(data)], [str(evaluation)], seed=0)[1:4]  # h2, b1 answers; h1 refusal
    out = tmp_path / "local.jsonl"
    assert g.generate_local(jobs, out, backbone=str(backbone_dir), max_tokens=6, batch_size=2) == 3
    rows = {r.id: r for r in load_rows(out)}
    assert set(rows) == {j.id for j in jobs}
    assert rows["mixed:b1:answer"].label == 0 and rows["mixed:b1:answer"].response
    assert rows["mixed:h1:refusal"].label == 0
    assert g.generate_local(jobs, out, backbone=str(backbone_dir), max_tokens=6) == 0


def test_cli_agreement_reports_json():
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "generate", "--agreement", str(FIXTURES / "responses.jsonl"),
         "--default-prompt-label", "1"], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)["responses.jsonl"]
    assert report["rows"] == 30 and 0.0 <= report["macro_f1"] <= 1.0


def test_cli_agreement_over_no_measurable_row_is_an_error():
    """Without a prompt label for any row (no --prompt-labels, no --default-prompt-label)
    the rule is measured on nothing: it reported `rows: 0, macro_f1: 0.0`, which reads as
    a rule that never agrees."""
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "generate", "--agreement", str(FIXTURES / "responses.jsonl")],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("siren-proxy generate: --agreement responses.jsonl: no row has both a response and a "
                           "prompt label (--prompt-labels, --default-prompt-label) to measure the rule on\n")


def test_cli_generate_without_out_is_a_clear_error():
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "generate", "--prompts", "x.jsonl"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "--out is required" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_generate_against_an_unreachable_server_is_a_clear_error(tmp_path):
    data, _ = prompt_rows(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "generate", "--prompts", str(data),
                           "--upstream", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1 and "ConnectError" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_resumes_after_a_kill_that_cut_the_last_row_short(tmp_path, katan_url):
    """A kill mid-write (the local generator flushes once a batch, so its buffer reaches
    the disk in pieces) leaves half a row at the end; the rerun that resumability is for
    raised JSONDecodeError, and would have appended its first row onto the half one."""
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [], [str(evaluation)], seed=0)
    out = tmp_path / "generated.jsonl"
    assert asyncio.run(g.generate(jobs, out, base_url=katan_url, api_key="k", max_tokens=64)) == 3
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # the second row cut mid-write
    assert asyncio.run(g.generate(jobs, out, base_url=katan_url, api_key="k", max_tokens=64)) == 2
    rows = load_rows(out)
    assert sorted(r.id for r in rows) == sorted(j.id for j in jobs)


def test_generate_names_a_broken_row_inside_its_output(tmp_path, katan_url):
    data, _ = prompt_rows(tmp_path)
    out = tmp_path / "generated.jsonl"
    out.write_text('{"id": "x"}\nnot json\n{"id": "y"}\n')
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "generate", "--prompts", str(data),
                           "--out", str(out), "--upstream", katan_url], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1] == f"siren-proxy generate: {out}:2: not valid JSON: Expecting value (column 1)"


def _flaky_server(broken: dict[str, bytes], slow: str | None = None):
    """Answers a chat request with `broken[prompt]` as its 200 body where given (a reply
    that is not a completion), else with a completion that complies; the `slow` prompt
    is answered after 3 s."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def chat(request):
        prompt = (await request.json())["messages"][0]["content"]
        if prompt == slow:
            await asyncio.sleep(3)
        if prompt in broken:
            return Response(broken[prompt], media_type="application/json")
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": "Sure: " + prompt}}]})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def test_generate_leaves_out_a_reply_that_is_not_a_completion_and_goes_on(tmp_path):
    """One 200 reply without choices (or not JSON) raised out of the whole run (exit 1),
    though a failed request is documented as logged and left out for a rerun."""
    from tests.support.servers import LiveServer

    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [], [str(evaluation)], seed=0)  # h1, h2, b1 answers
    out = tmp_path / "generated.jsonl"
    broken = {"Explain how to pick a neighbour's lock": b'{"choices": []}',
              "What is the capital of Peru?": b"<html>busy</html>"}
    with LiveServer(_flaky_server(broken)) as server:
        assert asyncio.run(g.generate(jobs, out, base_url=server.url + "/v1", model="m")) == 1
    assert [r.id for r in load_rows(out)] == ["mixed:h2:answer"]
    with LiveServer(_flaky_server({})) as server:
        assert asyncio.run(g.generate(jobs, out, base_url=server.url + "/v1", model="m")) == 2
    assert sorted(r.id for r in load_rows(out)) == sorted(j.id for j in jobs)


def test_generate_local_at_temperature_zero_is_greedy(tmp_path, backbone_dir):
    """--temperature 0 (greedy, as a server reads it) made transformers refuse to sample
    at temperature 0: a ValueError traceback before any row was written."""
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [], [str(evaluation)], seed=0)[2:3]  # b1
    texts = []
    for name in ("a.jsonl", "b.jsonl"):
        assert g.generate_local(jobs, tmp_path / name, backbone=str(backbone_dir), max_tokens=6,
                                temperature=0.0) == 1
        texts.append(load_rows(tmp_path / name)[0].response)
    assert texts[0] == texts[1] and texts[0]


def test_generate_leaves_out_a_request_that_times_out_and_goes_on(tmp_path):
    """One request past the timeout raised httpx.ReadTimeout out of the whole run (exit 1),
    losing the requests in flight beside it."""
    from tests.support.servers import LiveServer

    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [], [str(evaluation)], seed=0)  # h1, h2, b1 answers
    out = tmp_path / "generated.jsonl"
    with LiveServer(_flaky_server({}, slow="What is the capital of Peru?")) as server:
        assert asyncio.run(g.generate(jobs, out, base_url=server.url + "/v1", model="m", timeout=1.0)) == 2
    assert sorted(r.id for r in load_rows(out)) == ["mixed:h1:answer", "mixed:h2:answer"]


def test_generate_local_says_how_many_prompts_it_skips_as_too_long(tmp_path, backbone_dir, caplog):
    """Prompts over `max_prompt_tokens` were left out without a word: the run wrote fewer
    rows than it had jobs, and no line said why."""
    data, evaluation = prompt_rows(tmp_path)
    jobs = g.plan([str(data)], [], [str(evaluation)], seed=0)
    with caplog.at_level("WARNING", logger="guard.training.generate"):
        assert g.generate_local(jobs, tmp_path / "out.jsonl", backbone=str(backbone_dir), max_tokens=2,
                                max_prompt_tokens=5) == 0
    assert f"{len(jobs)} of {len(jobs)} prompts are over 5 tokens in the chat template: left out" in caplog.text
