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
        (["--model", "random:llama-tiny", "--max-tokens", "0", "hi"], "max_tokens must be at least 1"),
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
