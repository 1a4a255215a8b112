"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds, log-probabilities.

Log-probabilities are those of the model's raw distribution (before temperature and truncation),
as OpenAI and vLLM report them. A request with a seed draws from its own generator, so its tokens do
not depend on which other requests share the batch. The rows of a step that sample are drawn
together (a handful of batched operations, whatever the batch size).
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
        logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]
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

    def _rows_index(
        self, rows: list[int], params: list[SamplingParams]
    ) -> tuple[torch.Tensor, ...]:
        """(row index, temperature, top_k, top_p) of the sampled rows, on the device after one
        copy (from pinned memory on CUDA: it does not wait for the device)."""
        host = torch.tensor(
            [rows, [p.temperature for p in params], [max(p.top_k, 0) for p in params],
             [p.top_p for p in params]],
            dtype=torch.float64,
        )
        if self.device.type == "cuda":
            host = host.pin_memory()
        dev = host.to(self.device, non_blocking=True)
        return dev[0].long(), dev[1].float(), dev[2].long(), dev[3].float()

    def _sample_rows(
        self, logits: torch.Tensor, rows: list[int], reqs: list[Request]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rows' index on the device, one token for each): all rows at once. Temperature,
        then top-k, then top-p over what top-k kept, then one uniform draw per row looked up in
        the row's cumulative distribution (in vocabulary order). A seeded request's draw comes
        from its own generator, the others' from the engine's in one call: a seeded request's
        tokens do not depend on its batch companions, nor on whether their truncation sorted the
        batch."""
        params = [reqs[i].params for i in rows]
        index, temps, top_k, top_p = self._rows_index(rows, params)
        scaled = logits[index] / temps[:, None]
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
