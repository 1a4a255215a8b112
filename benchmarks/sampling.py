"""Sampling one decode step's tokens: the batched sampler (every sampled row at once) against the
row-at-a-time sampler it replaced, on the same logits in one run.

Mixes: `plain` (temperature 0.8), `nucleus` (temperature 0.8, top_p 0.95), `top_k` (temperature
0.8, top_k 50), `seeded` (nucleus, every request with its own seed). Vocabularies of SmolLM2
(49152) and Llama 3 (128256). Times the whole `sample` call, host sync included.

    .venv/bin/python benchmarks/sampling.py --out results/sampling.json
    python benchmarks/sampling.py --device cuda --out $OUT/sampling.json   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from oneiros.core import Request, SamplingParams
from oneiros.engine.sampler import _SAMPLING_EPS, Sampler

MIXES = {
    "plain": {"temperature": 0.8},
    "nucleus": {"temperature": 0.8, "top_p": 0.95},
    "top_k": {"temperature": 0.8, "top_k": 50},
    "seeded": {"temperature": 0.8, "top_p": 0.95, "seed": 0},
}


class RowSampler(Sampler):
    """The previous sampler: a loop over the sampled rows, each drawn on its own."""

    def sample(self, logits, reqs):
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        tokens = torch.argmax(logits, dim=-1)
        for row, req in enumerate(reqs):
            if not req.params.greedy and req.params.temperature >= _SAMPLING_EPS:
                tokens[row] = self._sample_row(logits[row], req.params, self._generator(req))
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        both = torch.stack((tokens.to(torch.float64), chosen.to(torch.float64))).tolist()
        return [int(t) for t in both[0]], both[1], None

    @staticmethod
    def _sample_row(logits, p, g):
        scaled = logits / p.temperature
        if p.top_k > 0 or p.top_p < 1.0:
            vals, idx = scaled.sort(descending=True)
            if p.top_k > 0:
                vals[p.top_k :] = float("-inf")
            if p.top_p < 1.0:
                probs = vals.softmax(-1)
                drop = probs.cumsum(-1) - probs >= p.top_p
                drop[0] = False
                vals = vals.masked_fill(drop, float("-inf"))
            choice = torch.multinomial(vals.softmax(-1), 1, generator=g)
            return idx[choice[0]]
        return torch.multinomial(scaled.softmax(-1), 1, generator=g)[0]


def requests(batch: int, mix: dict) -> list[Request]:
    reqs = []
    for i in range(batch):
        params = dict(mix)
        if "seed" in params:
            params["seed"] = i
        reqs.append(Request([1, 2, 3], SamplingParams(max_tokens=16, **params), "m"))
    return reqs


def per_call_s(sampler: Sampler, logits: torch.Tensor, reqs: list[Request], calls: int) -> float:
    sampler.sample(logits, reqs)  # warm-up
    t0 = time.perf_counter()
    for _ in range(calls):
        sampler.sample(logits, reqs)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="32,128")
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="results/sampling.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
            logits = logits.to(device)
            for name in args.mixes.split(","):
                reqs = requests(batch, MIXES[name])
                before = per_call_s(RowSampler(device), logits, reqs, args.calls)
                now = per_call_s(Sampler(device), logits, reqs, args.calls)
                rows.append({"vocab": vocab, "batch": batch, "mix": name, "before_ms": before * 1e3,
                             "now_ms": now * 1e3, "speedup": before / now})
                print(f"vocab {vocab:6d} batch {batch:4d} {name:8s}: row by row "
                      f"{before * 1e3:8.2f} ms, batched {now * 1e3:8.2f} ms ({before / now:.1f}x)",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": str(device), "results": rows},
                              indent=1) + "\n")


if __name__ == "__main__":
    main()
