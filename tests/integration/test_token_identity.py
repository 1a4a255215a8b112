"""Greedy outputs are token-identical to Hugging Face transformers.

Every oneiros output is compared with its own `generate(do_sample=False)` run in transformers
(batch 1, no padding, float32, the same weights), while oneiros runs all prompts together:
continuous batching of different lengths, prompts crossing many KV blocks, small blocks, chunked
prefill, requests arriving while others decode, and recompute preemption under a small memory
budget. Log-probabilities of the chosen tokens are compared too, so that a numerical bug too small
to flip a token still shows.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence

import pytest
import torch

from oneiros import LLM, SamplingParams
from oneiros.models.loader import CONFIG_DIR, ModelSource, hf_shapes, resolve

RANDOM_MODELS = ["random:llama-tiny", "random:qwen2-tiny", "random:opt-tiny"]
GREEDY = dict(temperature=0.0)
# float32 on both sides, but summation orders differ (paged attention, batched matmuls): measured
# logprob differences are 1e-5 to 6e-5 (tiny models and SmolLM2 alike); the bound leaves 15x margin.
LOGPROB_ATOL = 1e-3


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---- transformers references ---------------------------------------------------------------------
def hf_from_source(source: ModelSource) -> torch.nn.Module:
    """A transformers model with the source's weights (for random models: the same random draw)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**source.config.raw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        source.state_dict(hf_shapes(source.config)), strict=False
    )
    assert not unexpected, unexpected
    if source.config.tie_word_embeddings:
        assert missing == ["lm_head.weight"], missing
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    else:
        assert not missing, missing
    return model.eval()


class Reference:
    """Cached greedy runs of one transformers model, one prompt at a time."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._cache: dict[tuple, tuple[int, list[int], list[float]]] = {}

    def greedy(
        self, prompt: Sequence[int], max_tokens: int, ignore_eos: bool = False
    ) -> tuple[list[int], list[float]]:
        """Generated token ids (eos included when it stops there) and their log-probabilities.

        A shorter run is the prefix of a longer one (greedy is deterministic), so it is cut from the
        cache instead of being generated again."""
        key = (tuple(prompt), ignore_eos)
        hit = self._cache.get(key)
        if hit is None or hit[0] < max_tokens:
            self._cache[key] = (max_tokens, *self._generate(list(prompt), max_tokens, ignore_eos))
        _, toks, lps = self._cache[key]
        return toks[:max_tokens], lps[:max_tokens]

    def _generate(
        self, prompt: list[int], max_tokens: int, ignore_eos: bool
    ) -> tuple[list[int], list[float]]:
        # generate() fills unset (None) fields from model.generation_config, so eos is switched off
        # there, for this call only.
        saved = self.model.generation_config
        gc = copy.deepcopy(saved)
        if ignore_eos:
            gc.eos_token_id = None
        if gc.pad_token_id is None:
            gc.pad_token_id = 0
        gc.do_sample = False
        gc.max_new_tokens = max_tokens
        gc.output_logits = True
        gc.return_dict_in_generate = True
        ids = torch.tensor([prompt])
        self.model.generation_config = gc
        try:
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids))
        finally:
            self.model.generation_config = saved
        toks = out.sequences[0, len(prompt) :].tolist()
        lps = [
            torch.log_softmax(lg[0].float(), -1)[t].item()
            for lg, t in zip(out.logits, toks, strict=True)
        ]
        if ignore_eos:
            assert len(toks) == max_tokens
        return toks, lps


def assert_matches(out, ref: Reference, max_tokens: int, ignore_eos: bool, atol: float, what: str):
    """`out` (a finished RequestOutput) is what transformers generates alone for its prompt."""
    toks, lps = ref.greedy(out.prompt_token_ids, max_tokens, ignore_eos)
    if out.token_ids != toks:
        pairs = zip(out.token_ids, toks, strict=False)
        at = next(
            (i for i, (a, b) in enumerate(pairs) if a != b), min(len(toks), len(out.token_ids))
        )
        pytest.fail(
            f"{what}: prompt of {len(out.prompt_token_ids)} tokens: output differs from "
            f"transformers at token {at}"
            f"\n oneiros      {out.token_ids}\n transformers {toks}"
        )
    assert out.finished
    diff = max((abs(a - b) for a, b in zip(out.logprobs, lps, strict=True)), default=0.0)
    n = len(out.prompt_token_ids)
    assert diff <= atol, f"{what}: prompt of {n} tokens: logprobs differ by up to {diff:.2e}"


# ---- SmolLM2 -------------------------------------------------------------------------------------
_SENTENCES = [
    "The river valley was settled by farmers who grew barley, lentils and flax.",
    "In 1847 a railway line reached the town, and with it came the textile mills.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A binary search halves the interval at every step, so it needs logarithmic time.",
    "The committee met on Tuesday to discuss the budget for the new library wing.",
    "Mount Kilimanjaro, at 5,895 metres, is the highest mountain in Africa.",
    "She opened the window, and the smell of rain on warm stones filled the room.",
    "Prime numbers such as 2, 3, 5, 7, 11 and 13 have exactly two divisors.",
]
LONG_STORY = " ".join(_SENTENCES[i % 8] for i in range(2 * 8 + 5)) + " In summary,"
LONG_CODE = (
    "import math\n\n"
    + "\n\n".join(
        f'def area_{name}(r):\n    """Area of a {name} of size r."""\n    return {expr}\n'
        for name, expr in [
            ("circle", "math.pi * r * r"),
            ("square", "r * r"),
            ("triangle", "math.sqrt(3) / 4 * r * r"),
            ("hexagon", "3 * math.sqrt(3) / 2 * r * r"),
            ("octagon", "2 * (1 + math.sqrt(2)) * r * r"),
            ("semicircle", "math.pi * r * r / 2"),
        ]
    )
    + "\n\ndef area_pentagon(r):\n"
)

TEXT_PROMPTS = [
    ("france", "The capital of France is", 24),
    ("hi", "Hi", 24),
    ("code", "def fibonacci(n):\n", 32),
    ("count", "1, 1, 2, 3, 5, 8, 13,", 24),
    ("unicode", "Le café est très bon. 日本語のテキストも読めます。", 24),
    ("long-story", LONG_STORY, 32),
    ("long-code", LONG_CODE, 24),
]
CHAT_PROMPTS = [
    ("chat-japan", [{"role": "user", "content": "What is the capital of Japan?"}], 32),
    (
        "chat-pirate",
        [
            {"role": "system", "content": "You are a pirate."},
            {"role": "user", "content": "Tell me about the sea."},
        ],
        24,
    ),
    (
        "chat-multiturn",
        [
            {"role": "user", "content": "Give me a number between 1 and 10."},
            {"role": "assistant", "content": "7"},
            {"role": "user", "content": "Now double it and explain."},
        ],
        24,
    ),
    (
        "chat-long",
        [{"role": "user", "content": "Summarise this text in one sentence:\n" + LONG_STORY[:900]}],
        32,
    ),
    ("chat-poem", [{"role": "user", "content": "Write a haiku about autumn."}], 28),
]


@pytest.fixture(scope="module")
def smol_ref(smollm2_llm) -> Reference:
    from transformers import AutoModelForCausalLM

    src = smollm2_llm.engine.tenant(None).source
    assert src.hf_dir is not None
    return Reference(AutoModelForCausalLM.from_pretrained(src.hf_dir, dtype=torch.float32).eval())


@pytest.fixture(scope="module")
def smol_tok(smollm2_llm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_llm.engine.tenant(None).source.tokenizer_dir)


def _drain(engine, ids: set[str]) -> dict:
    done = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished and out.request_id in ids:
                done[out.request_id] = out
    return done


@pytest.mark.slow
def test_smollm2_batch_matches_transformers(smollm2_llm, smol_ref, smol_tok):
    """Text and chat prompts (1 to ~400 tokens) in one continuous batch, each equal to its own
    transformers run; prompts encode exactly as the Hugging Face tokenizer encodes them."""
    eng = smollm2_llm.engine
    assert not eng.has_unfinished()
    assert smollm2_llm.engine.tenant(None).model.dtype == torch.float32
    reqs = []
    for name, text, n in TEXT_PROMPTS:
        r = eng.add_request(text, SamplingParams(max_tokens=n, **GREEDY))
        assert r.prompt_token_ids == smol_tok(text)["input_ids"], name
        reqs.append((name, r, n))
    for name, msgs, n in CHAT_PROMPTS:
        r = eng.add_request(None, SamplingParams(max_tokens=n, **GREEDY), messages=msgs)
        expect = smol_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert r.prompt_token_ids == smol_tok(expect, add_special_tokens=False)["input_ids"], name
        reqs.append((name, r, n))
    lengths = [r.num_prompt_tokens for _, r, _ in reqs]
    assert max(lengths) >= 300 and min(lengths) <= 4, lengths  # many 16-token blocks, and tiny ones

    done = _drain(eng, {r.request_id for _, r, _ in reqs})
    for name, r, n in reqs:
        assert_matches(done[r.request_id], smol_ref, n, False, LOGPROB_ATOL, name)
    # Some chat answers end with <|im_end|> before max_tokens: eos is kept, as in transformers.
    assert any(done[r.request_id].finish_reason == "stop" for _, r, _ in reqs)
    eng.check_integrity()


@pytest.mark.slow
def test_smollm2_offline_api_matches_transformers(smollm2_llm, smol_ref):
    """`LLM.chat` and `LLM.generate` (other batches than above) give the same tokens."""
    params = SamplingParams(max_tokens=8, **GREEDY)
    chats = [c for c in CHAT_PROMPTS if c[0] in ("chat-japan", "chat-pirate", "chat-multiturn")]
    for (name, _, _), out in zip(
        chats, smollm2_llm.chat([m for _, m, _ in chats], params), strict=True
    ):
        assert_matches(out, smol_ref, 8, False, LOGPROB_ATOL, name)
        assert out.text == smollm2_llm.engine.tenant(None).tokenizer.decode(out.token_ids)
    texts = [t for t in TEXT_PROMPTS if t[0] in ("france", "count", "unicode")]
    for (name, _, _), out in zip(
        texts, smollm2_llm.generate([t for _, t, _ in texts], params), strict=True
    ):
        assert_matches(out, smol_ref, 8, False, LOGPROB_ATOL, name)


# ---- random-weight tiny models -------------------------------------------------------------------
TINY_LENGTHS = [1, 5, 16, 17, 40, 100]
TINY_MAX_TOKENS = 20


def tiny_prompts(vocab: int, lengths=TINY_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def tiny_refs() -> dict[str, Reference]:
    return {spec: Reference(hf_from_source(resolve(spec))) for spec in RANDOM_MODELS}


def test_random_models_vary(tiny_refs):
    """The random weights give varied greedy outputs; a model repeating one token would make the
    identity tests below nearly vacuous."""
    for spec, ref in tiny_refs.items():
        for p in tiny_prompts(512):
            toks, _ = ref.greedy(p, TINY_MAX_TOKENS, ignore_eos=True)
            assert len(set(toks)) >= 5, (spec, toks)


ENGINE_VARIANTS = {
    "default": {},
    "block4": {"block_size": 4},
    "chunked16": {"max_num_batched_tokens": 16},
    "block4-chunked7": {"block_size": 4, "max_num_batched_tokens": 7},
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
@pytest.mark.parametrize("spec", RANDOM_MODELS)
def test_random_model_batch_matches_transformers(spec, variant, tiny_refs):
    llm = LLM(spec, **ENGINE_VARIANTS[variant])
    prompts = tiny_prompts(llm.engine.tenant(None).model.cfg.vocab_size)
    params = SamplingParams(max_tokens=TINY_MAX_TOKENS, ignore_eos=True, **GREEDY)
    outs = llm.generate(prompts, params)
    for out in outs:
        assert out.finish_reason == "length"
        assert_matches(out, tiny_refs[spec], TINY_MAX_TOKENS, True, LOGPROB_ATOL, spec)
    llm.engine.check_integrity()


@pytest.mark.parametrize("spec", RANDOM_MODELS)
def test_requests_arriving_during_decode(spec, tiny_refs):
    """Waves of requests join a batch that is already decoding; every request still equals its
    solo transformers run. Different max_tokens make requests finish (and free blocks) at different
    steps."""
    eng = LLM(spec, block_size=8, max_num_batched_tokens=32).engine
    vocab = eng.tenant(None).model.cfg.vocab_size
    waves = [
        tiny_prompts(vocab, [7, 30, 3], seed=1),
        tiny_prompts(vocab, [50, 1, 12], seed=2),
        tiny_prompts(vocab, [9, 64], seed=3),
    ]
    max_tokens = iter([12, 20, 6, 16, 9, 20, 5, 14])
    reqs, done = [], {}

    def add(wave):
        for p in wave:
            n = next(max_tokens)
            params = SamplingParams(max_tokens=n, ignore_eos=True, **GREEDY)
            reqs.append((eng.add_request(p, params), n))

    def step(times=None):
        k = 0
        while eng.has_unfinished() and (times is None or k < times):
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
            k += 1

    add(waves[0])
    step(4)
    assert all(r.output_token_ids for r, _ in reqs), "first wave should be decoding by now"
    add(waves[1])
    step(3)
    add(waves[2])
    step()
    assert len(done) == len(reqs)
    for r, n in reqs:
        assert_matches(done[r.request_id], tiny_refs[spec], n, True, LOGPROB_ATOL, spec)
    eng.check_integrity()


@pytest.mark.parametrize("policy", ["recompute", "swap", "oneiros"])
@pytest.mark.parametrize("spec", ["random:llama-tiny", "random:opt-tiny"])
def test_preemption_matches_transformers(spec, policy, tiny_refs):
    """KV runs out. recompute: requests are preempted (their KV freed) and prefilled again with the
    tokens they already produced; swap: their KV goes to host memory and comes back; oneiros:
    parameter pages are remapped into KV instead, and layers streamed back. The outputs are still
    those of uninterrupted transformers runs."""
    from oneiros.memory.weights import weight_pages
    from oneiros.models.registry import build_model

    page = 64 * 1024
    cfg = resolve(spec).config
    kv_pages = 3
    weights = weight_pages(build_model(cfg, torch.float32, torch.device("cpu")), page)
    budget = (weights + kv_pages) * page
    llm = LLM(spec, memory_budget=budget, page_bytes=page, block_size=8, policy=policy)
    pool = llm.engine.tenant(None).pool
    capacity = kv_pages * pool.blocks_per_page * pool.block_size  # tokens of KV that fit
    prompts = tiny_prompts(cfg.vocab_size, [20, 33, 9, 41, 26, 14], seed=4)
    params = SamplingParams(max_tokens=TINY_MAX_TOKENS, ignore_eos=True, **GREEDY)
    need = sum(len(p) + TINY_MAX_TOKENS for p in prompts)
    assert max(len(p) for p in prompts) + TINY_MAX_TOKENS <= capacity < need  # each fits, not all

    outs = llm.generate(prompts, params)
    if policy == "oneiros":
        assert llm.engine.tenant(None).state.counters.remapped_layers > 0
    else:
        assert any(o.num_preemptions > 0 for o in outs), [o.num_preemptions for o in outs]
    if policy == "swap":
        assert llm.engine.tenant(None).state.counters.swap_in_bytes > 0
    for out in outs:
        assert out.finish_reason == "length"
        assert_matches(out, tiny_refs[spec], TINY_MAX_TOKENS, True, LOGPROB_ATOL, spec)
    llm.engine.check_integrity()


# ---- architecture variants -----------------------------------------------------------------------
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small: the prompts here reach scaled positions
}
CONFIG_VARIANTS = {
    # Llama 3.1 frequency-dependent RoPE scaling, in the transformers 5 and the legacy spelling.
    "llama3-rope": {"rope_parameters": {"rope_theta": 500000.0, **_LLAMA3_ROPE}},
    "llama3-rope-legacy": {"rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE},
    # Biases everywhere, head_dim != hidden / heads (q is wider than the hidden state), tied head.
    "bias-headdim-tied": {
        "attention_bias": True,
        "mlp_bias": True,
        "head_dim": 32,
        "tie_word_embeddings": True,
    },
    "mistral": {"model_type": "mistral", "sliding_window": None},
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_llama_config_variants_match_transformers(variant, tmp_path):
    base = json.loads((CONFIG_DIR / "llama-tiny.json").read_text())
    path = tmp_path / f"{variant}.json"
    path.write_text(json.dumps(base | CONFIG_VARIANTS[variant]))
    spec = f"random:{path}"
    ref = Reference(hf_from_source(resolve(spec)))
    llm = LLM(spec, block_size=8, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=TINY_MAX_TOKENS, ignore_eos=True, **GREEDY)
    for out in llm.generate(tiny_prompts(base["vocab_size"]), params):
        assert_matches(out, ref, TINY_MAX_TOKENS, True, LOGPROB_ATOL, variant)
