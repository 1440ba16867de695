#!/usr/bin/env python3
"""The reference for `anneal data dedup`: datatrove's four-stage MinHash deduplication.

Signatures per input file, buckets, clustering, then filtering, with datatrove's local executor,
as in its minhash_deduplication example. Prints one JSON line: documents removed and wall time.

    python3 bench/datatrove_minhash.py --input DIR --out DIR [--workers 2] [--buckets 14 --rows 8]
"""
import argparse
import glob
import gzip
import json
import os
import shutil
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter,
                                      MinhashDedupSignature)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.hashing import HashConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=14)
    ap.add_argument("--rows", type=int, default=8)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    files = sorted(glob.glob(os.path.join(args.input, "*.jsonl")))
    tasks = len(files)
    # sha1: datatrove 0.10.1 passes str to xxhash, which current xxhash releases refuse.
    config = MinhashConfig(n_grams=5, num_buckets=args.buckets, hashes_per_bucket=args.rows,
                           hash_config=HashConfig(hash_fc="sha1", precision=64))
    o = args.out
    start = time.time()
    stages = [
        ([JsonlReader(args.input, glob_pattern="*.jsonl"),
          MinhashDedupSignature(output_folder=f"{o}/signatures", config=config)], tasks),
        ([MinhashDedupBuckets(input_folder=f"{o}/signatures", output_folder=f"{o}/buckets", config=config)],
         args.buckets),
        ([MinhashDedupCluster(input_folder=f"{o}/buckets", output_folder=f"{o}/remove_ids", config=config)], 1),
        ([JsonlReader(args.input, glob_pattern="*.jsonl"),
          MinhashDedupFilter(input_folder=f"{o}/remove_ids", exclusion_writer=JsonlWriter(f"{o}/removed")),
          JsonlWriter(f"{o}/kept")], tasks),
    ]
    for i, (pipeline, n) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=args.workers,
                              logging_dir=f"{o}/logs/stage{i}").run()
    wall = time.time() - start

    def count(pattern):
        return sum(sum(1 for _ in gzip.open(f, "rt")) for f in glob.glob(pattern))

    print(json.dumps({"engine": "datatrove", "wall_seconds": wall, "kept": count(f"{o}/kept/*"),
                      "removed": count(f"{o}/removed/*"), "bands": args.buckets, "rows": args.rows}))


if __name__ == "__main__":
    main()
