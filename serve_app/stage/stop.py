"""Stop strings: text deltas in, the text safe to emit out, and whether a stop string has ended the completion.

A stop string may arrive split over several deltas, so the tail of the text that could still grow into one
is held back (at most `max(len(stop)) - 1` characters) and released as soon as it cannot. When a stop string
appears, everything before it is emitted and the stop string itself never is.

Which stop string wins: the first one to be completed, as the text grows character by character (the
generation would have stopped right there); among those completed by the same character, the one that
starts earliest. This depends only on the text, never on how it is split into deltas. It differs from
"earliest start" only when one stop string sits inside another, e.g. stops "abcd" and "bc" on "abcd": "bc"
completes first, so the output is "a".
"""


class StopStringMatcher:
    """Applies a request's stop strings to one sequence's text as it streams."""

    def __init__(self, stop: list[str]) -> None:
        assert all(stop), "the protocol rejects empty stop strings"
        self._stop = stop
        self._held = ""
        self._stopped = False

    def push(self, text_delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string has been matched); nothing follows a match."""
        if self._stopped:
            return "", True
        if not self._stop:
            return text_delta, False
        text = self._held + text_delta
        cut = self._first_stop(text)
        if cut is not None:
            self._stopped = True
            self._held = ""
            return text[:cut], True
        keep = self._partial_stop_length(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, when generation ends without a stop string (length, EOS)."""
        held, self._held = self._held, ""
        return held

    def _first_stop(self, text: str) -> int | None:
        """Where the winning stop string in `text` starts, or None when none occurs."""
        # For each stop string, its first occurrence is also the one that ends first; then compare ends,
        # and starts to break ties.
        matches = [(start + len(s), start) for s in self._stop if (start := text.find(s)) != -1]
        return min(matches)[1] if matches else None

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string (0 when none does)."""
        longest = min(len(text), max(len(s) for s in self._stop) - 1)
        for size in range(longest, 0, -1):
            tail = text[len(text) - size :]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
