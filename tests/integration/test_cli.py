"""The `oneiros` command end to end: the built-in model answers, bad input names the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "oneiros.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_generate_chat_answers_paris() -> None:
    r = run_cli(
        "generate", "--model", "smollm2", "--chat", "--max-tokens", "16",
        "What is the capital of France?",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--model", "no-such-model", "hi"], "unknown model source 'no-such-model'"),
        (["--model", "random:llama-tiny", ""], "the prompt is empty"),
        (["--model", "random:llama-tiny", "--max-tokens", "0", "hi"],
         "max_tokens must be at least 1"),
        (["--model", "random:nope-config", "hi"], "unknown config 'nope-config'"),
        (["--model", "random:llama-tiny", "--memory-budget", "lots", "hi"], "cannot read 'lots'"),
        (["--model", "random:llama-tiny", "--memory-budget", "1MiB", "hi"], "too small"),
        (["--model", "random:llama-tiny", "--device", "tpu", "hi"], "device"),
        (["--model", "random:llama-tiny", "--threads", "0", "hi"], "--threads"),
    ],
)
def test_bad_input_is_a_clear_error(args: list[str], expected: str) -> None:
    r = run_cli("generate", *args)
    assert r.returncode == 2
    assert expected in r.stderr
    assert "Traceback" not in r.stderr


def test_prompt_longer_than_context_is_rejected() -> None:
    r = run_cli(
        "generate", "--model", "smollm2", "--max-model-len", "8",
        "one two three four five six seven eight nine ten eleven twelve",
    )
    assert r.returncode == 2
    assert "context window 8" in r.stderr
    assert "Traceback" not in r.stderr


def test_random_model_needs_token_ids_not_text() -> None:
    r = run_cli("generate", "--model", "random:llama-tiny", "hello")
    assert r.returncode == 2
    assert "no tokenizer" in r.stderr


def test_version_and_help_show_defaults() -> None:
    import oneiros

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"oneiros {oneiros.__version__}"
    serve = run_cli("serve", "--help").stdout
    for needle in ("(default: 8000)", "(default: oneiros)", "(default: 256)", "(default: 16)",
                   "default: the weights plus 1 GiB"):
        assert needle in " ".join(serve.split()), needle
    generate = " ".join(run_cli("generate", "--help").stdout.split())
    assert "(default: 64)" in generate and "(default: recompute)" in generate
    bench = " ".join(run_cli("bench", "--help").stdout.split())
    assert "(default: results/bench.json)" in bench


def test_bad_request_refused_before_the_model_loads() -> None:
    """The request is checked first: a model that does not exist is not even looked for."""
    r = run_cli("generate", "--model", "no-such-model", "--max-tokens", "0", "hi")
    assert r.returncode == 2 and "max_tokens must be at least 1" in r.stderr


def test_busy_cpu_warning() -> None:
    import io

    from oneiros.cli import warn_busy_cpu

    out = io.StringIO()
    assert warn_busy_cpu(load=3.0, cores=2, out=out)
    assert "--threads 1" in out.getvalue()
    assert not warn_busy_cpu(load=0.2, cores=2, out=out)


def test_generate_token_ids_and_streaming(tmp_path) -> None:
    r = run_cli("generate", "--model", "random:llama-tiny", "--token-ids", "1,2,3",
                "--max-tokens", "5", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.split()) == 5 and all(x.isdigit() for x in r.stdout.split())
    r = run_cli("generate", "--model", "random:llama-tiny", "--token-ids", "1,x")
    assert r.returncode == 2 and "--token-ids" in r.stderr


def hub_cache(root, repo: str) -> dict[str, str]:
    """A local Hugging Face cache holding `repo` (a tiny Llama with the SmolLM2 tokenizer), laid
    out as huggingface_hub lays it out; returns the environment that points at it, offline."""
    from pathlib import Path

    from tests.helpers import tiny_llama_dir

    commit = "0123456789abcdef0123456789abcdef01234567"
    base = Path(root) / ("models--" + repo.replace("/", "--"))
    tiny_llama_dir(base / "snapshots" / commit)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    return {"HF_HUB_CACHE": str(root), "HF_HUB_OFFLINE": "1"}


def test_hugging_face_model_id_from_the_local_cache(tmp_path) -> None:
    import os

    env = {**os.environ, **hub_cache(tmp_path / "hub", "tiny-org/tiny-llama")}
    r = subprocess.run(
        [sys.executable, "-m", "oneiros.cli", "generate", "--model", "tiny-org/tiny-llama",
         "--max-tokens", "4", "--threads", "1", "Hello"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = subprocess.run(
        [sys.executable, "-m", "oneiros.cli", "generate", "--model", "tiny-org/missing", "Hi"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert r.returncode == 2
    assert "not in the local Hugging Face cache" in r.stderr and "Traceback" not in r.stderr


def test_llm_generate_batches_several_models(tmp_path) -> None:
    from oneiros import LLM, SamplingParams
    from tests.helpers import tiny_llama_dir

    path = str(tiny_llama_dir(tmp_path / "tiny"))
    llm = LLM(models={"a": path, "b": path}, memory_budget="256MiB")
    outs = llm.generate(["Hello", "Hi", [5, 6, 7]], SamplingParams(max_tokens=3, temperature=0),
                        model=["a", "b", "a"])
    assert [o.model for o in outs] == ["a", "b", "a"]
    assert all(len(o.token_ids) == 3 for o in outs)
    with pytest.raises(ValueError, match="3 prompts but 2 models"):
        llm.generate(["a", "b", "c"], model=["a", "b"])


def test_served_model_names_map_to_models() -> None:
    import argparse

    from oneiros.cli import _served_names
    from oneiros.core import OneirosError

    def names(*given: str) -> argparse.Namespace:
        return argparse.Namespace(served_model_name=list(given) or None)

    assert _served_names(names(), ["a"]) == {}
    assert _served_names(names("m", "m-latest"), ["a"]) == {"m": "a", "m-latest": "a"}
    assert _served_names(names("x", "y"), ["a", "b"]) == {"x": "a", "y": "b"}
    with pytest.raises(OneirosError, match="give 2 names"):
        _served_names(names("x"), ["a", "b"])
