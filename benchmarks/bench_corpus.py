"""Corpora of any size (issue 19): prepare rates, and the trainer's memory, startup and
loader speed on a small and a large corpus, side by side in one run.

    python benchmarks/bench_corpus.py                     # 1 GB and 20 GB (~15-25 min)
    python benchmarks/bench_corpus.py --sizes-gb 0.05,0.2 # a quick look
    python benchmarks/bench_corpus.py --dir /big/disk     # where the corpora are written

Everything is generated here, on local disk, and deleted at the end (`--keep` keeps it);
CI never runs this. For each size:

1. raw files (documents of 1-512 KiB of text-like bytes) are written, then prepared with
   `soma_models.corpus.prepare` (the prepare rate on raw files), and the raw files deleted.
   On the first size the same prepare also writes into `--tmpfs` (memory): the code's own
   rate, without the disk's (prepare fsyncs every shard before the corpus appears);
2. `soma-models train --data CORPUS/` of the `tiny` model runs a few steps in a fresh
   process: its peak RSS (`wait4`'s `ru_maxrss`, that process alone), its startup (from
   the command to the first step's metrics line) and its tokens/s (how fast the model
   consumes rows);
   Startup is the time to the first step's metrics line less one step's time;
3. the loader alone (`ChunkStream.take`, `ChunkTable.prefetch` of the next step's rows and
   `ChunkTable.rows`: what the trainer calls per step) runs for a few seconds in this
   process: rows/s. Before 2 and 3 the corpus's pages are dropped from the page cache
   (`evict`): both sizes are measured cold.

JSONL and Parquet prepare rates are measured once, on the first size, with documents of
~4 KiB (one per line / row).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parents[1] / "src"
POOL_BYTES = 64 << 20
SEQ_LEN, BATCH = 512, 16


def text_pool(seed: int = 0) -> np.ndarray:
    """Text-like bytes (letters, spaces, newlines) that documents are sliced from."""
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"etaoinshrdlucmfwypvbgkjqxz      \n\n.,", np.uint8)
    return alphabet[rng.integers(0, len(alphabet), POOL_BYTES)]


def write_raw(folder: Path, total: int, pool: np.ndarray, seed: int = 1) -> int:
    """Raw files of 1-512 KiB (log-uniform), 1000 per sub-folder, `total` bytes in all."""
    rng = np.random.default_rng(seed)
    written = count = 0
    while written < total:
        size = int(min(total - written, np.exp(rng.uniform(np.log(1 << 10), np.log(512 << 10)))))
        start = int(rng.integers(0, len(pool) - size))
        sub = folder / f"{count // 1000:05d}"
        if count % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{count:08d}.txt").write_bytes(pool[start:start + size].tobytes())
        written += size
        count += 1
    return count


def write_rows(folder: Path, total: int, pool: np.ndarray) -> tuple[Path, Path]:
    """The same ~4 KiB documents as one JSONL and one Parquet file of about `total` bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    jsonl, parquet = folder / "rows.jsonl", folder / "rows.parquet"
    written = 0
    with open(jsonl, "w") as fh, pq.ParquetWriter(parquet, pa.schema([("text", pa.string())])
                                                  ) as writer:
        while written < total:
            sizes = rng.integers(1 << 11, 3 << 11, 4096)
            starts = rng.integers(0, len(pool) - (3 << 11), 4096)
            texts = [pool[s:s + n].tobytes().decode() for s, n in zip(starts, sizes, strict=True)]
            fh.write("".join(json.dumps({"text": t}) + "\n" for t in texts))
            writer.write_table(pa.table({"text": texts}))
            written += int(sizes.sum())
    return jsonl, parquet


def evict(corpus: Path) -> None:
    """Drop the corpus's files from the page cache (theirs only: POSIX_FADV_DONTNEED), so
    that both sizes start cold, as a corpus larger than memory always is."""
    for path in corpus.iterdir():
        with open(path, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run_train(corpus: Path, out: Path, steps: int) -> dict:
    """`soma-models train` in a fresh process: peak RSS, startup, tokens/s."""
    cmd = [sys.executable, "-m", "soma_models", "train", "--data", str(corpus), "--out",
           str(out), "--config", "tiny", "--seq-len", str(SEQ_LEN), "--batch-size", str(BATCH),
           "--steps", str(steps), "--eval-every", "0", "--checkpoint-every", "0",
           "--val-max-bytes", str(1 << 16), "--score-seq-len", "1024", "--no-plot",
           "--no-progress", "--warmup-steps", "2", "--threads", "1",
           "--sig-reg-positions", "512"]  # the demo's settings (scripts/demo.sh)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics, first_step = out / "metrics.jsonl", None
    while child.poll() is None and first_step is None:
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            first_step = time.perf_counter() - started
        time.sleep(0.02)
    _, status, usage = os.wait4(child.pid, 0)
    stdout, stderr = child.communicate()
    if status != 0:
        raise SystemExit(f"train failed: {stderr.decode()[-2000:]}")
    records = [r for r in map(json.loads, metrics.read_text().splitlines())
               if r["kind"] == "train"]
    # tokens_per_s is cumulative over the run's steps; a step's time from the last record.
    speed = records[-1]["tokens_per_s"]
    step_s = SEQ_LEN * BATCH / speed
    # The first metrics line comes after the first step: the step itself is not startup.
    return {"peak_rss_mb": usage.ru_maxrss / 1024, "startup_s": first_step - step_s,
            "first_step_done_s": first_step, "step_s": step_s, "tokens_per_s": speed,
            "wall_s": time.perf_counter() - started}


def loader_rate(corpus: Path, seconds: float = 5.0) -> tuple[float, float]:
    """Rows/s of the trainer's data path alone (the stream, then the rows), and the
    seconds its setup takes (open, split, chunk table, held-out bytes: the data's share
    of the trainer's startup)."""
    sys.path.insert(0, str(SRC))
    from soma_models.train.data import ChunkStream, open_training_data

    started = time.perf_counter()
    data = open_training_data([corpus], 0.1, "bytes")
    table = data.table(SEQ_LEN)
    data.split.heldout(1 << 24)
    setup = time.perf_counter() - started
    stream = ChunkStream(len(table), seed=0)
    rows, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        indices = stream.take(BATCH)
        table.prefetch(stream.peek(BATCH))  # as the trainer does: the next step's rows
        table.rows(indices)
        rows += BATCH
    return rows / (time.perf_counter() - started), setup


def prepare_rate(sources: list[Path], out: Path, **options) -> dict:
    sys.path.insert(0, str(SRC))
    from soma_models.corpus import prepare

    result = prepare(sources, out, **options)
    return {"input_mb": result.input_bytes / 1e6, "seconds": result.seconds,
            "mb_per_s": result.input_rate / 1e6, "documents": result.documents}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-gb", default="1,20")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--tmpfs", default="/dev/shm",
                        help="also prepare the first size into this memory folder ('' : no)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="soma-bench-corpus-", dir=args.dir))
    pool = text_pool()
    results = {}
    try:
        for n, size_gb in enumerate(float(s) for s in args.sizes_gb.split(",")):
            total = int(size_gb * 1e9)
            label = f"{size_gb:g} GB"
            raw = root / f"raw-{n}"
            started = time.perf_counter()
            files = write_raw(raw, total, pool)
            print(f"[{label}] wrote {files:,} raw files in {time.perf_counter() - started:.0f} s",
                  flush=True)
            corpus = root / f"corpus-{n}"
            entry = {"raw": prepare_rate([raw], corpus, workers=args.workers)}
            if n == 0 and args.tmpfs and Path(args.tmpfs).is_dir():
                # The same prepare into memory (tmpfs): the code's own rate, no disk.
                shm = Path(tempfile.mkdtemp(prefix="soma-bench-", dir=args.tmpfs))
                try:
                    entry["raw_to_tmpfs"] = prepare_rate([raw], shm / "c", workers=args.workers)
                finally:
                    shutil.rmtree(shm)
                print(f"[{label}] prepare raw into {args.tmpfs}: {entry['raw_to_tmpfs']}",
                      flush=True)
            shutil.rmtree(raw)
            print(f"[{label}] prepare raw: {entry['raw']}", flush=True)
            if n == 0:
                rows_total = min(total, 1 << 30)
                jsonl, parquet = write_rows(root / "rows", rows_total, pool)
                for kind, path in (("jsonl", jsonl), ("parquet", parquet)):
                    entry[kind] = prepare_rate([path], root / f"c-{kind}", workers=args.workers)
                    shutil.rmtree(root / f"c-{kind}")
                    print(f"[{label}] prepare {kind}: {entry[kind]}", flush=True)
                shutil.rmtree(root / "rows")
            evict(corpus)
            entry["train"] = run_train(corpus, root / f"run-{n}", args.steps)
            entry["load_average"] = os.getloadavg()[0]
            evict(corpus)
            print(f"[{label}] train: {entry['train']}", flush=True)
            entry["loader_rows_per_s"], entry["data_setup_s"] = loader_rate(corpus)
            entry["model_rows_per_s"] = entry["train"]["tokens_per_s"] / SEQ_LEN
            entry["loader_over_model"] = entry["loader_rows_per_s"] / entry["model_rows_per_s"]
            print(f"[{label}] data setup {entry['data_setup_s']:.2f} s; "
                  f"loader {entry['loader_rows_per_s']:,.0f} rows/s, model "
                  f"{entry['model_rows_per_s']:,.0f} rows/s: x{entry['loader_over_model']:.0f}",
                  flush=True)
            results[label] = entry
            if not args.keep:
                shutil.rmtree(corpus)
        labels = list(results)
        print("\n== summary")
        for label in labels:
            r = results[label]
            print(f"{label:>7}: peak RSS {r['train']['peak_rss_mb']:,.0f} MB, startup "
                  f"{r['train']['startup_s']:.1f} s (data setup {r['data_setup_s']:.2f} s, load "
                  f"{r['load_average']:.1f}), prepare raw {r['raw']['mb_per_s']:,.0f} MB/s, "
                  f"loader / model x{r['loader_over_model']:.0f}")
        if len(labels) >= 2:
            small, large = results[labels[0]], results[labels[-1]]
            print(f"peak RSS {labels[-1]} / {labels[0]}: "
                  f"{large['train']['peak_rss_mb'] / small['train']['peak_rss_mb']:.3f}")
        first = results[labels[0]]
        if "raw_to_tmpfs" in first:
            print(f"prepare raw into tmpfs ({labels[0]}): "
                  f"{first['raw_to_tmpfs']['mb_per_s']:,.0f} MB/s")
        for kind in ("jsonl", "parquet"):
            if kind in first:
                print(f"prepare {kind}: {first[kind]['mb_per_s']:,.0f} MB/s "
                      f"({first[kind]['documents']:,} documents)")
        print(json.dumps(results))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
