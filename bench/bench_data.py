"""Data-quality throughput: dedup (exact, MinHash) and contamination on a generated corpus, with peak memory.

Generates a JSONL corpus of about --mb MB: documents of 150-1,500 words made by sampling sentences from the
embedded corpus (so their vocabulary is real), 5% of them near-copies of earlier ones (5% of words edited)
and 2% exact copies, and an eval file of 2,000 items of which 10% are passages of the training documents.
Each measurement runs in its own process, so its peak RSS is its own. For scale, datasketch's MinHash
(update_batch, the same 2-gram shingles and 128 permutations) signs a sample of the corpus too.

    python bench/bench_data.py --mb 200
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def generate(path: Path, mb: int, eval_path: Path) -> None:
    from gptlab.data import pydocs

    rnd = random.Random(0)
    sentences = [s.strip() for d in pydocs.documents() for s in d.replace("\n", " ").split(". ") if len(s.split()) > 4]
    target, size, docs = mb << 20, 0, []
    with open(path, "w", encoding="utf-8") as f:
        i = 0
        while size < target:
            r = rnd.random()
            if r < 0.05 and docs:
                words = rnd.choice(docs).split()
                text = " ".join(w if rnd.random() > 0.05 else rnd.choice(words) for w in words)
            elif r < 0.07 and docs:
                text = rnd.choice(docs)
            else:
                text, n = [], rnd.randint(150, 1500)
                while sum(len(s.split()) for s in text) < n:
                    text.append(rnd.choice(sentences))
                text = ". ".join(text) + "."
            if len(docs) < 5000:
                docs.append(text)
            elif rnd.random() < 0.01:
                docs[rnd.randrange(5000)] = text
            line = json.dumps({"id": f"d{i}", "text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            i += 1
    with open(eval_path, "w", encoding="utf-8") as f:
        for k in range(2000):
            if k % 10 == 0:
                words = rnd.choice(docs).split()
                at = rnd.randrange(max(1, len(words) - 40))
                q = " ".join(words[at:at + 40])
            else:
                q = " ".join(f"w{rnd.randrange(10**6)}" for _ in range(40))  # words no document has
            f.write(json.dumps({"id": f"e{k}", "question": q, "choices": ["a", "b"], "label": 0}) + "\n")


def worker(mode: str, corpus: str, eval_path: str, out: str) -> None:
    t0 = time.perf_counter()
    if mode in ("exact", "minhash"):
        from gptlab.data.quality import Cleaner, Deduper, read_documents

        c = Cleaner(Deduper(mode))
        for doc in read_documents(corpus):
            c.check(doc)
        extra = {"removed": c.counts["documents"] - c.counts["kept"], "documents": c.counts["documents"]}
    elif mode == "contamination":
        from gptlab.data.contamination import find_contamination

        r = find_contamination(corpus, [eval_path], out, show_progress=False)
        extra = {"contaminated": r.files[0]["contaminated"], "examples": r.files[0]["examples"]}
    else:  # datasketch on the first 20 MB
        from datasketch import MinHash

        from gptlab.data.quality import read_documents, words

        seen = 0
        for doc in read_documents(corpus):
            ws = words(doc.text)
            m = MinHash(num_perm=128)
            m.update_batch([f"{a} {b}".encode() for a, b in zip(ws, ws[1:])])
            seen += len(doc.text.encode("utf-8"))
            if seen > 20 << 20:
                break
        extra = {"sample_bytes": seen}
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": mode, "seconds": wall, "peak_rss_mb": rss, **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus, evals = Path(tmp) / "corpus.jsonl", Path(tmp) / "eval.jsonl"
        t = time.perf_counter()
        generate(corpus, args.mb, evals)
        mb = corpus.stat().st_size / 2**20
        print(f"generated {mb:.0f} MB in {time.perf_counter() - t:.0f} s", flush=True)
        for mode in ("exact", "minhash", "contamination", "datasketch"):
            r = subprocess.run([sys.executable, __file__, "--worker", mode, str(corpus), str(evals), tmp + "/out"],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{mode}: failed\n{r.stderr[-2000:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            size = res.get("sample_bytes", mb * 2**20) / 2**20
            info = {k: v for k, v in res.items() if k not in ("mode", "seconds", "peak_rss_mb", "sample_bytes")}
            print(f"{mode:14s} {size / res['seconds']:7.2f} MB/s  peak RSS {res['peak_rss_mb']:7.0f} MB  "
                  f"({size:.0f} MB in {res['seconds']:.1f} s) {info}", flush=True)


if __name__ == "__main__":
    main()
