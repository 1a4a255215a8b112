"""SamplingParams validation, parse_bytes and EngineConfig checks."""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest

from oneiros.cli import _add_engine_args
from oneiros.config import EngineConfig, GiB, MiB, parse_bytes
from oneiros.core import ConfigError, InvalidRequestError, OneirosError, SamplingParams


# ---- SamplingParams -----------------------------------------------------------------------------
def test_defaults_and_normalisation():
    p = SamplingParams()
    assert p.max_tokens == 16 and not p.greedy and p.stop == () and p.logprobs is None
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=[1, 2]).stop_token_ids == (1, 2)
    hash(SamplingParams(stop=["a"], stop_token_ids=[3]))  # frozen and hashable after normalising


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 1},
        {"temperature": 0.0},
        {"temperature": 100.0},
        {"top_p": 1e-9},
        {"top_p": 1.0},
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1000},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": 0},
        {"seed": -5},
    ],
)
def test_valid_params(kwargs):
    SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
    ],
)
def test_invalid_params_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert param in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, OneirosError)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"top_k": 2.5}, "top_k"),
        ({"logprobs": 1.5}, "logprobs"),
        ({"seed": 2**70}, "seed"),
        ({"temperature": "hot"}, "temperature"),
    ],
)
def test_invalid_param_types_name_the_param(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


# ---- parse_bytes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,value",
    [
        ("2GiB", 2 * GiB),
        ("2gib", 2 * GiB),
        ("2G", 2 * GiB),
        ("2GB", 2 * 10**9),
        ("512MiB", 512 * MiB),
        ("512m", 512 * MiB),
        ("512MB", 512 * 10**6),
        ("4k", 4096),
        ("4KiB", 4096),
        ("4kb", 4000),
        ("100", 100),
        ("100b", 100),
        ("1", 1),
        ("0", 0),
        (" 3 MiB ", 3 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5", 0.5),
        (".25", 0.25),
        ("1.0", 1.0),
        ("9007199254740993", 9007199254740993),  # 2**53 + 1: exact (float would round it)
        ("123456789123456789k", 123456789123456789 * 1024),
    ],
)
def test_parse_bytes(text, value):
    got = parse_bytes(text)
    assert got == value and type(got) is type(value)


def test_parse_bytes_passes_numbers_through():
    assert parse_bytes(1024) == 1024 and isinstance(parse_bytes(1024), int)
    assert parse_bytes(0.8) == 0.8


@pytest.mark.parametrize("text", ["", "abc", "-1", "2TiB", "1e9", "GiB", "1.", "2 Gi B", True])
def test_parse_bytes_errors(text):
    with pytest.raises(ConfigError, match="size"):
        parse_bytes(text)


# ---- EngineConfig -------------------------------------------------------------------------------
def test_engine_config_defaults_and_budget_parsing():
    c = EngineConfig(models={"a": "opt-tiny"})
    assert c.memory_budget is None
    assert EngineConfig(memory_budget="64MiB").memory_budget == 64 * MiB
    assert EngineConfig(memory_budget="0.5").memory_budget == 0.5
    assert EngineConfig(memory_budget=123 * MiB).memory_budget == 123 * MiB


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"models": {}}, "at least one model"),
        ({"models": {"bad name": "x"}}, "model name"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 12}, "block_size"),
        ({"page_bytes": 1000}, "page_bytes"),
        ({"page_bytes": 0}, "page_bytes"),
        ({"page_bytes": 4096 + 1}, "page_bytes"),
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"dtype": "int8"}, "dtype"),
        ({"memory_budget": "lots"}, "size"),
        ({"h2d_bytes_per_s": 0}, "h2d_bytes_per_s"),
        ({"h2d_bytes_per_s": float("nan")}, "h2d_bytes_per_s"),
        ({"kv_watermark": 1.0}, "kv_watermark"),
        ({"kv_watermark": -0.01}, "kv_watermark"),
        ({"turn_max_s": 0}, "turn_max_s"),
        ({"turn_max_s": float("nan")}, "turn_max_s"),
        ({"admit_remap_after_s": -1.0}, "admit_remap_after_s"),
        ({"admit_remap_after_s": float("nan")}, "admit_remap_after_s"),
        ({"sim_noise": 1.0}, "sim_noise"),
        ({"sim_noise": float("nan")}, "sim_noise"),
    ],
)
def test_engine_config_rejects(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


@pytest.mark.parametrize(("fallback", "preemption", "ahead"), [
    ("recompute", "recompute", False), ("swap", "swap", False), ("pie", "swap", True),
])
def test_remapping_falls_back_to_any_preemption_policy(fallback, preemption, ahead):
    from oneiros.engine.policies import memory_policy

    policy = memory_policy(EngineConfig(models={"a": "random:llama-tiny"}, policy="oneiros",
                                        remap_fallback=fallback))
    assert (policy.remaps, policy.preemption, policy.async_swap_in) == (True, preemption, ahead)
    with pytest.raises(ConfigError, match="remap_fallback must be recompute, swap or pie"):
        EngineConfig(models={"a": "random:llama-tiny"}, remap_fallback="static")


def test_cli_engine_flags_default_to_the_engine_config():
    """Every engine flag of the CLI starts from EngineConfig's default (read from it, so the two
    cannot drift apart); the policy is chosen per command, and --swap-space shows its default
    in units."""
    p = argparse.ArgumentParser()
    _add_engine_args(p, "oneiros")
    fields = {f.name: f.default for f in dataclasses.fields(EngineConfig)}
    checked = 0
    for action in p._actions:
        if action.dest not in fields or action.dest == "policy":
            continue
        want = fields[action.dest]
        got = parse_bytes(action.default) if action.dest == "swap_space" else action.default
        assert got == want, f"--{action.dest}: {action.default!r} against {want!r}"
        checked += 1
    assert checked >= 20
