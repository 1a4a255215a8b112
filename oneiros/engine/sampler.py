"""Next-token selection: greedy, temperature, top-k, top-p, per-request seeds, log-probabilities.

Log-probabilities are those of the model's raw distribution (before temperature and truncation), as
OpenAI and vLLM report them. A request with a seed draws from its own generator, so its tokens do not
depend on which other requests share the batch.
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
        for row, req in enumerate(reqs):
            # A temperature this close to 0 is greedy in all but name, and dividing by it would
            # overflow the logits to inf (multinomial then fails on NaN probabilities).
            if not req.params.greedy and req.params.temperature >= _SAMPLING_EPS:
                tokens[row] = self._sample_row(logits[row], req.params, self._generator(req))
        chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
        top = None
        if any(r.params.logprobs is not None for r in reqs):
            # Every request that asked (logprobs=0 included) gets one dict per token, whatever
            # its batch companions asked for; never more alternatives than the vocabulary has.
            want = min(max((r.params.logprobs or 0) for r in reqs), logprobs.shape[-1])
            vals, ids = logprobs.topk(want, dim=-1)
            vals_l, ids_l = vals.tolist(), ids.tolist()
            top = [
                dict(zip(ids_l[i][: r.params.logprobs or 0], vals_l[i][: r.params.logprobs or 0]))
                for i, r in enumerate(reqs)
            ]
        # One device-to-host copy (and host sync) for the batch's tokens and their log-probabilities;
        # token ids are exact in float64.
        both = torch.stack((tokens.to(torch.float64), chosen.to(torch.float64))).tolist()
        return [int(t) for t in both[0]], both[1], top

    @staticmethod
    def _sample_row(logits: torch.Tensor, p: SamplingParams, g: torch.Generator) -> torch.Tensor:
        scaled = logits / p.temperature
        if p.top_k > 0 or p.top_p < 1.0:
            vals, idx = scaled.sort(descending=True)
            if p.top_k > 0:
                vals[p.top_k :] = float("-inf")
            if p.top_p < 1.0:
                probs = vals.softmax(-1)
                # Drop a token when the tokens ranked above it already reach top_p.
                drop = probs.cumsum(-1) - probs >= p.top_p
                drop[0] = False
                vals = vals.masked_fill(drop, float("-inf"))
            choice = torch.multinomial(vals.softmax(-1), 1, generator=g)
            return idx[choice[0]]
        return torch.multinomial(scaled.softmax(-1), 1, generator=g)[0]
