"""Run by the python of vLLM's CPU venv (tests/vllm/make_venv.sh), not darwin's: load each model with vLLM and
print, after RESULT on a line of its own per model, a JSON list of {"tokens": greedy continuation, "prompt_logprobs": the
log-probability vLLM gives each prompt token after the ones before it (None for the first)} per prompt.

    python client.py '[{"model": DIR, "prompts": [[ids]], "max_tokens": 8, "dtype": "float32"}]'

`memory` (default 0.1) is the share of the machine's memory vLLM may reserve (on CPU, its gpu_memory_utilization);
`activations: "unquantized"` runs NVFP4 W4A4 layers weight-only (tests/vllm/plugin).
"""

import gc
import json
import os
import sys


def run(job: dict) -> list[dict]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # read by the test plugin in the engine's processes, which start with this environment
    os.environ["DARWIN_VLLM_NVFP4_ACTIVATIONS"] = job.get("activations", "nvfp4")
    llm = LLM(model=job["model"], dtype=job.get("dtype", "auto"), skip_tokenizer_init=True, enforce_eager=True,
              max_model_len=256, seed=0, gpu_memory_utilization=job.get("memory", 0.1))
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], prompt_logprobs=0, detokenize=False)
    # no bar: under TQDM_DISABLE (as in CI) vLLM divides by the bar's elapsed time, 0
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, use_tqdm=False)
    results = []
    for ids, output in zip(job["prompts"], outputs):
        logprobs = [None if entry is None else entry[token].logprob
                    for token, entry in zip(ids, output.prompt_logprobs)]
        results.append({"tokens": list(output.outputs[0].token_ids), "prompt_logprobs": logprobs})
    del llm
    gc.collect()
    return results


if __name__ == "__main__":  # vLLM spawns processes: its entry point must be guarded
    for job in json.loads(sys.argv[1]):
        print("RESULT " + json.dumps(run(job)), flush=True)
