"""Reference run for the end-to-end test: one plain vLLM instance (no connector), greedy, float32.

    python tests/e2e/reference_vllm.py MODEL_DIR '[max_tokens, ...]' '[[prompt token ids], ...]'

Prints the generated token ids of each prompt as JSON (REFERENCE), and for each token the margin of its
logprob over the runner-up's (MARGINS): where that is tiny, another batch shape may break the tie the
other way (no CPU kernel here is batch-invariant). Its own process: vLLM's engine core needs a __main__ guard.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(1)
    model, max_tokens, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=2048, block_size=32, enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        [SamplingParams(max_tokens=m, temperature=0, logprobs=2) for m in max_tokens])
    margins = []
    for o in outs:
        row = []
        for tok, top in zip(o.outputs[0].token_ids, o.outputs[0].logprobs, strict=True):
            others = sorted((lp.logprob for t, lp in top.items() if t != tok), reverse=True)
            row.append(top[tok].logprob - others[0] if others else 1e9)
        margins.append(row)
    print("MARGINS " + json.dumps(margins), flush=True)
    print("REFERENCE " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)


if __name__ == "__main__":
    main()
