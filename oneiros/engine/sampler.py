"""Next-token selection: greedy, temperature, top-k, top-p, min-p, per-request seeds, penalties
(presence, frequency, repetition), logit bias, allowed tokens, log-probabilities.

The logits of the rows that ask for it are changed first, in vLLM's order: allowed tokens, logit
bias, then the penalties (repetition, frequency, presence); greedy and sampled picks both read the
changed logits. Log-probabilities are those of the model's raw distribution (before any of that,
temperature and truncation), as OpenAI and vLLM report them by default. A request with a seed
draws from its own generator, so its tokens do not depend on which other requests share the
batch. The rows of a step that sample are drawn together (a handful of batched operations,
whatever the batch size).
"""

from __future__ import annotations

import torch

from oneiros.core import Request, SamplingParams

_SAMPLING_EPS = 1e-5  # temperatures below this sample greedily (as vLLM does)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._default = torch.Generator(device=device).manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self._default
        g = self._generators.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(req.params.seed)
            self._generators[req.request_id] = g
        return g

    def sample(
        self, logits: torch.Tensor, reqs: list[Request]
    ) -> tuple[list[int], list[float], list[dict[int, float]] | None]:
        """logits: [N, V] float32 -> one token per row, its log-probability, optional top-n."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V] of the raw logits
        logits = self.process_logits(logits, reqs)
        tokens = torch.argmax(logits, dim=-1)  # [N] greedy for every row; sampled rows overwrite
        # A temperature this close to 0 is greedy in all but name, and dividing by it would
        # overflow the logits to inf (and the probabilities to NaN).
        rows = [
            i for i, r in enumerate(reqs)
            if not r.params.greedy and r.params.temperature >= _SAMPLING_EPS
        ]
        if rows:
            index, choice = self._sample_rows(logits, rows, reqs)
            tokens[index] = choice
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = None
        if any(r.params.logprobs is not None for r in reqs):
            # Every request that asked (logprobs=0 included) gets one dict per token, whatever
            # its batch companions asked for; never more alternatives than the vocabulary has.
            want = min(max((r.params.logprobs or 0) for r in reqs), logprobs.shape[-1])
            vals, ids = logprobs.topk(want, dim=-1)
            vals_l, ids_l = vals.tolist(), ids.tolist()
            top = [
                dict(zip(ids_l[i][: r.params.logprobs or 0], vals_l[i][: r.params.logprobs or 0],
                         strict=True))
                for i, r in enumerate(reqs)
            ]
        # One device-to-host copy (and host sync) for the batch's tokens and their
        # log-probabilities; token ids are exact in float64.
        both = torch.stack((tokens.to(torch.float64), chosen.to(torch.float64))).tolist()
        return [int(t) for t in both[0]], both[1], top

    def process_logits(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """logits [N, V] with each penalized row changed (allowed tokens, logit bias, repetition,
        frequency and presence penalties); the same tensor when no row asks for any of it."""
        rows = [i for i, r in enumerate(reqs) if r.params.penalized]
        if not rows:
            return logits
        vocab = logits.shape[-1]
        params = [reqs[i].params for i in rows]
        index = torch.tensor(rows, device=logits.device)
        sub = logits[index]  # [R, V] a copy: the raw logits stay as they are
        allowed = [(k, p.allowed_token_ids) for k, p in enumerate(params) if p.allowed_token_ids]
        if allowed:
            keep = _row_bins([ids for _, ids in allowed], vocab, logits.device) > 0  # [A, V]
            at = torch.tensor([k for k, _ in allowed], device=logits.device)
            sub[at] = sub[at].masked_fill(~keep, float("-inf"))
        bias = [(k, t, b) for k, p in enumerate(params) for t, b in p.logit_bias if t < vocab]
        if bias:
            rk, tok, val = zip(*bias, strict=True)
            sub.index_put_(
                (torch.tensor(rk, device=sub.device), torch.tensor(tok, device=sub.device)),
                torch.tensor(val, dtype=sub.dtype, device=sub.device),
                accumulate=True,
            )
        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
               for p in params):
            out = [reqs[i].output_token_ids for i in rows]
            counts = _row_bins(out, vocab, logits.device)  # [R, V] generated-token counts
            host = torch.tensor(
                [[p.repetition_penalty, p.frequency_penalty, p.presence_penalty] for p in params],
                dtype=sub.dtype,
            ).to(logits.device)
            rep, freq, pres = host[:, 0:1], host[:, 1:2], host[:, 2:3]
            if any(p.repetition_penalty != 1.0 for p in params):
                seen = (counts > 0) | (_row_bins([reqs[i].prompt_token_ids for i in rows], vocab,
                                                 logits.device) > 0)
                sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
            sub = sub - freq * counts - pres * (counts > 0).to(sub.dtype)
        out_logits = logits.clone()
        out_logits[index] = sub
        return out_logits

    def _rows_index(
        self, rows: list[int], params: list[SamplingParams]
    ) -> tuple[torch.Tensor, ...]:
        """(row index, temperature, top_k, top_p, min_p) of the sampled rows, on the device after
        one copy (from pinned memory on CUDA: it does not wait for the device)."""
        host = torch.tensor(
            [rows, [p.temperature for p in params], [max(p.top_k, 0) for p in params],
             [p.top_p for p in params], [p.min_p for p in params]],
            dtype=torch.float64,
        )
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        return dev[0].long(), dev[1].float(), dev[2].long(), dev[3].float(), dev[4].float()

    def _sample_rows(
        self, logits: torch.Tensor, rows: list[int], reqs: list[Request]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows' index on the device, one token for each): all rows at once. Temperature,
        then min-p, then top-k, then top-p over what top-k kept, then one uniform draw per row
        looked up in the row's cumulative distribution (in vocabulary order). A seeded request's
        draw comes from its own generator, the others' from the engine's in one call: a seeded
        request's tokens do not depend on its batch companions, nor on whether their truncation
        sorted the batch."""
        params = [reqs[i].params for i in rows]
        index, temps, top_k, top_p, min_p = self._rows_index(rows, params)
        scaled = logits[index] / temps[:, None]
        if any(p.min_p > 0.0 for p in params):
            probs = scaled.softmax(-1)
            floor = probs.amax(-1, keepdim=True) * min_p[:, None]
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        if any(p.top_p < 1.0 for p in params):
            scaled = self._nucleus(scaled, top_k, top_p)
        elif any(p.top_k > 0 for p in params):
            scaled = self._top_k(scaled, top_k, max(p.top_k for p in params))
        # float64: a float32 running sum over 10^5 tokens would misweigh the tail.
        cdf = scaled.softmax(-1).double().cumsum_(-1)
        u = torch.empty(len(rows), dtype=torch.float64, device=logits.device)
        if any(p.seed is None for p in params):
            u.uniform_(generator=self._default)
        for k, i in enumerate(rows):
            if params[k].seed is not None:
                u[k : k + 1].uniform_(generator=self._generator(reqs[i]))
        # The first token whose cumulative probability exceeds u * total: token j with p_j = 0
        # is never it (its total equals the one before it).
        choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        return index, choice.clamp_(max=cdf.shape[-1] - 1)

    @staticmethod
    def _top_k(scaled: torch.Tensor, top_k: torch.Tensor, k_max: int) -> torch.Tensor:
        """Rows with top_k > 0 keep their top_k best logits; rows with top_k == 0 keep all."""
        vals, ids = scaled.topk(min(k_max, scaled.shape[-1]), dim=-1)
        rank = torch.arange(vals.shape[-1], device=vals.device)
        vals = vals.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
        kept = torch.full_like(scaled, float("-inf")).scatter_(1, ids, vals)
        return torch.where(top_k[:, None] > 0, kept, scaled)

    @staticmethod
    def _nucleus(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """Top-k (rows with top_k > 0), then top-p over the renormalised rest (rows with
        top_p < 1): a token goes when the tokens ranked above it already reach top_p."""
        ranked, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)
        ranked = ranked.masked_fill(
            (top_k[:, None] > 0) & (rank[None, :] >= top_k[:, None]), float("-inf")
        )
        probs = ranked.softmax(-1)
        drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
        drop[:, 0] = False
        ranked = ranked.masked_fill(drop, float("-inf"))
        return torch.empty_like(ranked).scatter_(1, order, ranked)  # back to vocabulary order


def _row_bins(rows: list, vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] float counts of each row's token ids (ids outside the vocabulary are
    dropped): one bincount over the flattened rows."""
    flat = [k * vocab + t for k, ids in enumerate(rows) for t in ids if 0 <= t < vocab]
    counts = torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=len(rows) * vocab)
    return counts.view(len(rows), vocab).to(device=device, dtype=torch.float32)
