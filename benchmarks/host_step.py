"""Host work per decode step that grows with output length: detokenising and snapshotting each
running request's output. Compares, in one run, what a step cost before (full decode of every
output, copies of its token, log-probability and time lists) with what it costs now
(`IncrementalText`, `Prefix` views), for a batch of requests at several output lengths, with the
built-in model's tokenizer.

    .venv/bin/python benchmarks/host_step.py --out results/host_step.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from oneiros.core import Prefix
from oneiros.engine.tokenizer import IncrementalText, Tokenizer, stable_text
from oneiros.models.loader import resolve


def per_step_s(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for k in range(steps):
        fn(k)
    return (time.perf_counter() - t0) / steps


def measure(tok, pool: list[int], n: int, batch: int, steps: int, rng) -> tuple[float, float]:
    """Seconds per step, before and now, for `batch` requests that have generated n tokens."""
    outs = []
    for _ in range(batch):
        start = rng.randrange(0, len(pool) - n - steps)
        outs.append(pool[start : start + n + steps])
    ids_a, f_a = [ids[:n] for ids in outs], [[0.5] * n for _ in outs]
    ids_b, f_b = [ids[:n] for ids in outs], [[0.5] * n for _ in outs]
    incs = [IncrementalText(tok) for _ in outs]
    for inc, ids in zip(incs, ids_b, strict=True):
        inc.update(ids[:-1])  # steady state: the decoder has followed the request token by token
        inc.update(ids)

    def before(k: int) -> None:
        for full, ids, f in zip(outs, ids_a, f_a, strict=True):
            ids.append(full[n + k])
            f.append(0.5)
            stable_text(tok, ids)
            list(ids), list(f), list(f)  # token ids, logprobs, times

    def now(k: int) -> None:
        for full, inc, ids, f in zip(outs, incs, ids_b, f_b, strict=True):
            ids.append(full[n + k])
            f.append(0.5)
            inc.update(ids)
            Prefix(ids), Prefix(f), Prefix(f)

    return per_step_s(before, steps), per_step_s(now, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lengths", default="100,1000,4000", help="output tokens already generated")
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed per length")
    ap.add_argument("--out", default="results/host_step.json")
    args = ap.parse_args()
    tok = Tokenizer(resolve("smollm2").tokenizer_dir)
    text = Path(__file__).read_text()  # real text, so the ids decode to ordinary words
    pool = tok.encode(text * 20)
    rng = random.Random(0)
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        old_s, new_s = measure(tok, pool, n, args.batch, args.steps, rng)
        rows.append({"output_tokens": n, "batch": args.batch, "before_ms": old_s * 1e3,
                     "now_ms": new_s * 1e3, "speedup": old_s / new_s})
        print(f"{n:5d} tokens x {args.batch}: before {old_s * 1e3:8.2f} ms/step, "
              f"now {new_s * 1e3:6.2f} ms/step ({old_s / new_s:.1f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
