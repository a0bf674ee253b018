"""Stop strings without Ray: deltas in, the text before the first completed stop string out, any split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.stage.stop import StopStringMatcher

# A small alphabet makes stop strings, partial ones and overlaps common in random text.
ALPHABET = "abc "
texts = st.text(alphabet=ALPHABET, max_size=40)
stop_lists = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=5), max_size=4)


def expected(text: str, stop: list[str]) -> tuple[str, bool]:
    """The oracle: grow the text a character at a time; the first stop string completed cuts it."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stop if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]


def run(stop: list[str], deltas: list[str]) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop)
    out = []
    for delta in deltas:
        text, stopped = matcher.push(delta)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@settings(max_examples=400, derandomize=True, deadline=None)
@given(text=texts, stop=stop_lists, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_cuts_at_first_completed_stop(text: str, stop: list[str], cuts: list[int]) -> None:
    assert run(stop, split(text, cuts)) == expected(text, stop)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(text=texts, stop=stop_lists.filter(bool), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_holds_back_only_what_may_start_a_stop(text: str, stop: list[str], cuts: list[int]) -> None:
    matcher = StopStringMatcher(stop)
    pushed, emitted = "", ""
    for delta in split(text, cuts):
        out, stopped = matcher.push(delta)
        emitted += out
        if stopped:
            return
        pushed += delta
        assert pushed.startswith(emitted)
        held = pushed[len(emitted) :]
        assert len(held) <= max(len(s) for s in stop) - 1
        # Released as soon as it cannot be the start of a stop string.
        assert held == "" or any(s.startswith(held) for s in stop)


def test_no_stop_strings_pass_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("Hel") == ("Hel", False)
    assert matcher.push("lo") == ("lo", False)
    assert matcher.flush() == ""


def test_stop_string_spanning_deltas() -> None:
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.push("Sure.\n") == ("Sure.", False)
    assert matcher.push("Us") == ("", False)
    assert matcher.push("er: hi") == ("", True)


def test_partial_stop_released_when_it_cannot_match() -> None:
    matcher = StopStringMatcher(["###"])
    assert matcher.push("a ##") == ("a ", False)
    assert matcher.push(" b") == ("## b", False)
    assert matcher.push("#") == ("", False)
    assert matcher.flush() == "#"


def test_first_completed_stop_wins() -> None:
    # "bc" completes before "abcd" could, so the generation stops after "a".
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True)
    # Completed by the same character: the one starting earlier cuts.
    assert run(["bcd", "abcd"], ["xab", "cd"]) == ("x", True)


def test_nothing_after_a_stop() -> None:
    matcher = StopStringMatcher(["."])
    assert matcher.push("Hi. More") == ("Hi", True)
    assert matcher.push("text") == ("", True)
    assert matcher.flush() == ""
