"""Phase 2's vLLM engine, run as a script by the Python that has vLLM (`phase2.vllm.python`), never imported by
darwin: vLLM pins its own transformers, so it may live in another environment. darwin.vllm_engine drives it.

    python vllm_worker.py '{"model": DIR, "dtype": "auto", "max_model_len": null, "memory": 0.5, "seed": 0}'

One engine on the father's checkpoint, then JSON lines on stdin, each answered by one line `DARWIN {...}` on stdout
(vLLM logs there too):
- {"op": "load", "file": PATH, "tensors": [[name, torch dtype name, shape, byte offset], ...]}: the candidate's
  tensors, under their checkpoint names, raw in a file of shared memory, loaded in place through vLLM's
  `reload_weights` (its own checkpoint-name mapping and weight loaders; nothing is written as a checkpoint);
- {"op": "score", "requests": [[context ids, continuation ids], ...]}: per request [sum of the continuation's
  log-probabilities, whether every continuation token is vLLM's top-1], lm-eval's loglikelihood.
Replies carry "error" instead when a request fails; end of input ends the engine.
"""

import json
import os
import sys
import traceback

# reload_weights is handed an iterator over shared memory: the engine must run in this process
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"



def reply(message: dict) -> None:
    sys.stdout.write("DARWIN " + json.dumps(message) + "\n")
    sys.stdout.flush()


def tensors_in(path: str, specs: list):
    import numpy as np
    import torch

    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: writable buffers, the file untouched
    for name, dtype_name, shape, offset in specs:
        dtype = getattr(torch, dtype_name)
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        yield name, torch.frombuffer(memoryview(data[offset:offset + size]), dtype=dtype).reshape(shape)


def score(llm, requests: list, max_len: int) -> list:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # prompt_logprobs=1: each prompt token's log-probability and rank (and the top-1's)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    prompts = [(context + continuation)[-max_len:] for context, continuation in requests]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
    results = []
    for ids, (_, continuation), output in zip(prompts, requests, outputs):
        entries = output.prompt_logprobs[len(ids) - len(continuation):]
        picked = [entry[token] for token, entry in zip(ids[len(ids) - len(continuation):], entries)]
        results.append([sum(p.logprob for p in picked), all(p.rank == 1 for p in picked)])
    return results


def main() -> None:
    settings = json.loads(sys.argv[1])
    from vllm import LLM

    llm = LLM(model=settings["model"], dtype=settings.get("dtype", "auto"), skip_tokenizer_init=True,
              enforce_eager=True, max_model_len=settings.get("max_model_len"), seed=settings.get("seed", 0),
              gpu_memory_utilization=settings.get("memory", 0.5))
    max_len = llm.llm_engine.model_config.max_model_len
    reply({"ready": True, "max_model_len": max_len})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "load":
                llm.collective_rpc("reload_weights", kwargs={
                    "weights_iterator": tensors_in(request["file"], request["tensors"]), "is_checkpoint_format": True})
                reply({"ok": True})
            elif request["op"] == "score":
                reply({"results": score(llm, request["requests"], max_len)})
            else:
                reply({"error": f"unknown op {request['op']!r}"})
        except Exception as exc:  # the engine stays up; darwin raises the message
            reply({"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})


if __name__ == "__main__":  # vLLM may spawn processes: the entry point must be guarded
    main()
