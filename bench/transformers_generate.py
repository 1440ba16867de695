"""Generation speed of a GGUF Llama in transformers (weights dequantised to f32 at load, as its
GGUF loader does) or in llama.cpp (through llama-cpp-python, on the quantised file): the
reference `anneal bench generate` compares against. Prints one JSON line per batch size.

    python3 bench/transformers_generate.py --model FILE.gguf --batch 1,16 --tokens 64 --threads 2
    python3 bench/transformers_generate.py --model FILE.gguf --engine llama.cpp --batch 1

Prompts are the ones `anneal bench generate` passes (--prompts; PROMPTS by default), cycled to
fill the batch; greedy,
exactly --tokens new tokens per sequence (no early stop), left-padded batches, KV cache.
"""

import argparse
import json
import os
import time

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one sentence.",
    "List three uses of a paperclip:",
    "Once upon a time, in a land far away,",
    "The three laws of thermodynamics are",
    "def fibonacci(n):",
    "Translate to French: Good morning, how are you?",
]


def transformers_run(args, batches):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    directory, file = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=file, dtype=torch.float32)
    model.eval()
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            # Warm-up, then time to first token (one new token) and the whole generation.
            model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=1, min_new_tokens=1, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            total = time.perf_counter() - t0
        new = (out.shape[1] - enc["input_ids"].shape[1]) * b
        print(json.dumps(dict(engine="transformers", batch=b, tokens=new, seconds=total,
                              tokens_per_s=new / total, ttft_s=ttft)), flush=True)


def llama_cpp_run(args, batches):
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=1024, n_threads=args.threads, n_batch=512,
                verbose=False)
    for b in batches:
        if b != 1:
            print(json.dumps(dict(engine="llama.cpp", batch=b, skipped="llama-cpp-python generates one sequence at a time")))
            continue
        prompt = PROMPTS[0]
        llm(prompt, max_tokens=2, temperature=0.0)
        # reset(): llama-cpp-python would otherwise reuse the previous call's prompt cache.
        llm.reset()
        t0 = time.perf_counter()
        llm(prompt, max_tokens=1, temperature=0.0)
        ttft = time.perf_counter() - t0
        llm.reset()
        t0 = time.perf_counter()
        out = llm(prompt, max_tokens=args.tokens, temperature=0.0, stop=[])
        total = time.perf_counter() - t0
        new = out["usage"]["completion_tokens"]
        print(json.dumps(dict(engine="llama.cpp", batch=1, tokens=new, seconds=total,
                              tokens_per_s=new / total, ttft_s=ttft)), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"])
    p.add_argument("--batch", default="1,16")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompts", help="a JSON file holding a list of prompts (default: PROMPTS)")
    args = p.parse_args()
    if args.prompts:
        with open(args.prompts) as f:
            PROMPTS[:] = json.load(f)
    batches = [int(b) for b in args.batch.split(",")]
    if args.engine == "transformers":
        transformers_run(args, batches)
    else:
        llama_cpp_run(args, batches)


if __name__ == "__main__":
    main()
