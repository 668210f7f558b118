"""Runs inside the vLLM environment (.venv-vllm), called by test_vllm.py: greedy token ids from `vllm.LLM`
with the looped plugin, for each job given as JSON on argv; prints one line `RESULT <json>`."""

from __future__ import annotations

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: faster to start


def main() -> None:
    from vllm import LLM, SamplingParams

    results = []
    for job in json.loads(sys.argv[1]):
        llm = LLM(
            model=job["model"],
            hf_overrides=job["overrides"],
            dtype="float32",
            max_model_len=job["max_model_len"],
            enforce_eager=True,
            seed=0,
        )
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in job["prompts"]],
            SamplingParams(max_tokens=job["max_tokens"], temperature=0),
            use_tqdm=False,
        )
        results.append([list(o.outputs[0].token_ids) for o in outs])
        del llm
        gc.collect()
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
