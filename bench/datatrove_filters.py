#!/usr/bin/env python3
"""The reference for `anneal data pipeline`'s quality filters: the same filters in datatrove.

Runs datatrove's JsonlReader → C4QualityFilter → GopherQualityFilter → GopherRepetitionFilter →
JsonlWriter (kept documents, and the removed ones through exclusion writers) with its local
executor, and prints one JSON line with the counts and the wall time.

    python3 bench/datatrove_filters.py --input DIR --out DIR [--workers 2]
"""
import argparse
import glob
import json
import os
import shutil
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def count_lines(pattern):
    n = 0
    for f in glob.glob(pattern, recursive=True):
        import gzip
        opener = gzip.open if f.endswith(".gz") else open
        with opener(f, "rt") as fh:
            n += sum(1 for _ in fh)
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    files = sorted(glob.glob(os.path.join(args.input, "*.jsonl")))
    start = time.time()
    ex = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(args.input, glob_pattern="*.jsonl"),
            C4QualityFilter(
                exclusion_writer=JsonlWriter(f"{args.out}/removed/c4"),
                split_paragraph=False,
                remove_citations=False,
            ),
            GopherQualityFilter(exclusion_writer=JsonlWriter(f"{args.out}/removed/gopher_quality")),
            GopherRepetitionFilter(exclusion_writer=JsonlWriter(f"{args.out}/removed/gopher_repetition")),
            JsonlWriter(f"{args.out}/kept"),
        ],
        tasks=len(files),
        workers=args.workers,
        logging_dir=f"{args.out}/logs",
    )
    ex.run()
    wall = time.time() - start
    size = sum(os.path.getsize(f) for f in files)
    print(json.dumps({
        "engine": "datatrove",
        "wall_seconds": wall,
        "input_mb": size / 1e6,
        "kept": count_lines(f"{args.out}/kept/*"),
        "removed": {s: count_lines(f"{args.out}/removed/{s}/*") for s in ["c4", "gopher_quality", "gopher_repetition"]},
    }))


if __name__ == "__main__":
    main()
