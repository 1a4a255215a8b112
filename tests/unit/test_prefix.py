"""`Prefix`: a step's output shares the request's append-only lists as views of fixed length."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from oneiros.core import Prefix


@given(st.lists(st.integers()), st.lists(st.integers()), st.integers(-20, 20), st.integers(-20, 20),
       st.sampled_from([None, 1, 2, -1, 3]))
def test_a_prefix_is_a_snapshot_of_the_list(items, appended, a, b, step):
    live = list(items)
    view = Prefix(live)
    snapshot = list(items)
    live.extend(appended)  # the request keeps growing after the output was made
    assert len(view) == len(snapshot) and list(view) == snapshot
    assert view == snapshot and snapshot == view and view == tuple(snapshot)
    assert view[a:b:step] == snapshot[a:b:step]
    for i in (a, b):
        if -len(snapshot) <= i < len(snapshot):
            assert view[i] == snapshot[i]
        else:
            try:
                view[i]
            except IndexError:
                pass
            else:
                raise AssertionError(f"index {i} of a view of length {len(snapshot)}")
    assert bool(view) == bool(snapshot) and repr(view) == repr(snapshot)
    assert (view == snapshot + [0]) is False


def test_engine_outputs_are_views_until_finished():
    from oneiros.config import EngineConfig
    from oneiros.core import SamplingParams
    from oneiros.engine.engine import LLMEngine

    e = LLMEngine(EngineConfig(models={"m": "random:llama-tiny"}, memory_budget="64MiB",
                               page_bytes=64 * 1024))
    e.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), "m")
    seen = []
    while e.has_unfinished():
        seen += e.step()
    assert [len(o.token_ids) for o in seen] == [1, 2, 3, 4]  # earlier outputs did not grow
    assert all(len(o.token_times) == len(o.logprobs) == len(o.token_ids) for o in seen)
    assert type(seen[-1].token_ids) is list and seen[-1].finished
    assert list(seen[2].token_ids) == seen[-1].token_ids[:3]
