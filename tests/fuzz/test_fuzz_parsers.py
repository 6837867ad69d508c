"""F1 in CI for the atProtocol wire parsers (reliability-checks.md row F1).

hypothesis drives the same ``fuzz_<name>`` functions that atheris runs nightly
(tests/fuzz/atheris_targets.py), 2,000 examples per property: random bytes, mutated
known-answer vectors (the spec-derived seed corpus) and generated valid traffic.  Invariant:
parse or AtProtocolError, chunking-independent, bounded buffers, and re-encoding whatever parsed.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noports.at.commands import encode_command, parse_command
from noports.at.responses import ResponseParser
from tests.fuzz import atheris_targets as targets
from tests.unit.test_commands import commands
from tests.unit.test_responses import reply_streams

pytestmark = pytest.mark.fuzz

F1 = settings(max_examples=2000, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_EDIT_BYTES = b":@ \n\r{}\"-0123456789aZ\x00\xff\xc3\xa9"


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A seed with a few byte-level edits (insert, delete, replace, duplicate a slice)."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        if op == 0:
            data[pos:pos] = bytes([draw(st.sampled_from(_EDIT_BYTES))])
        elif op == 1 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 2 and data:
            data[min(pos, len(data) - 1)] = draw(st.integers(0, 255))
        else:
            length = draw(st.integers(0, 24))
            start = draw(st.integers(0, len(data)))
            data[pos:pos] = data[start:start + length]
    return bytes(data)


def _inputs(name: str):
    return st.one_of(st.binary(max_size=300), mutated(targets.SEEDS[name]))


@pytest.mark.parametrize("name", sorted(targets.TARGETS))
def test_seed_corpus_passes(name):
    """Every known-answer vector of the seed corpus satisfies its target's invariant."""
    assert targets.SEEDS[name]
    for seed in targets.SEEDS[name]:
        targets.TARGETS[name](seed)


@F1
@given(commands)
def test_command_round_trip(cmd):
    """Generated commands: encode -> parse gives an equal command; the line is one line."""
    line = encode_command(cmd)
    assert "\n" not in line and line == line.strip()
    assert parse_command(line) == cmd
    targets.check_command_line(line)


@F1
@given(_inputs("command"))
def test_command_garbage(data):
    """Bytes -> LineReader -> parse_command: AtProtocolError or a command that re-encodes."""
    targets.fuzz_command(data)


@F1
@given(st.one_of(_inputs("response"), reply_streams.map(lambda s: s[0])))
def test_response_garbage(data):
    """Reply streams (random, mutated, generated): same outcome for every chunking."""
    targets.fuzz_response(data)


@settings(F1, max_examples=1000)      # generation-heavy; the same streams also feed the 2,000
@given(reply_streams)                 # examples of test_response_garbage
def test_response_round_trip(stream):
    """Server-shaped output (encode_* helpers) parses to exactly the events it was built from,
    in one chunk and one byte at a time."""
    data, expected = stream
    assert ResponseParser().feed(data) == expected
    parser, events = ResponseParser(), []
    for i in range(len(data)):
        events += parser.feed(data[i:i + 1])
    assert events == expected


@F1
@given(_inputs("root"))
def test_root_garbage(data):
    targets.fuzz_root(data)


@F1
@given(st.one_of(_inputs("notification"),
                 st.recursive(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True),
                                        st.integers(), st.text(max_size=8)),
                              lambda inner: st.one_of(
                                  st.lists(inner, max_size=3),
                                  st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                              max_leaves=10).map(lambda v: repr(v).encode())))
def test_notification_garbage(data):
    targets.fuzz_notification(data)


def test_atheris_entry_point_usage(capsys):
    """The nightly entry point rejects unknown targets (and says why without atheris)."""
    assert targets.main(["atheris_targets", "nope"]) == 2
    assert "usage" in capsys.readouterr().err
    try:
        import atheris  # noqa: F401
    except ImportError:
        assert targets.main(["atheris_targets", "command", "-runs=1"]) == 2
        assert "atheris is not installed" in capsys.readouterr().err
