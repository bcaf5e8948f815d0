"""The JSON stream splitter: any split of a stream of messages gives back the same messages."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from hvcpolicy.simulator.jsonstream import JSONStreamSplitter

scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
messages = st.dictionaries(st.text(max_size=6), values, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(messages, min_size=1, max_size=5),
    st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    st.sampled_from(["", " ", "\n", "\r\n", "\t "]),
)
def test_any_split_gives_the_same_messages(
    msgs: list[dict[str, object]], cuts: list[int], sep: str
) -> None:
    stream = sep.join(json.dumps(m, ensure_ascii=bool(len(msgs) % 2)) for m in msgs).encode()
    splitter = JSONStreamSplitter()
    chunks = []
    pos = 0
    for cut in cuts:
        chunks += splitter.feed(stream[pos : pos + cut])
        pos += cut
    chunks += splitter.feed(stream[pos:])
    assert all(c.error is None for c in chunks)
    assert [json.loads(c.text) for c in chunks] == msgs


def test_limits_skip_only_the_offending_value() -> None:
    splitter = JSONStreamSplitter(max_message=64, max_depth=4)
    out = splitter.feed(b'{"a": "' + b"x" * 100 + b'"} {"ok": 1} [[[[[1]]]]] {"ok": 2}')
    assert [c.error is not None for c in out] == [True, False, True, False]
    assert [json.loads(c.text) for c in out if c.error is None] == [{"ok": 1}, {"ok": 2}]
