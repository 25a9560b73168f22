"""Generated tokens to text, with stop sequences: what is safe to send so far.

Text is decoded from all of a request's tokens each time (a token can change how the
previous ones decode: byte-level pieces of one character). Held back until more tokens
arrive: a trailing incomplete character (U+FFFD) and any tail that could be the start of
a stop sequence, so a stop sequence never reaches the client, streamed or not.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class TextTracker:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids) if self.tokenizer else ""

    def add(self, token: int) -> str:
        """Append a token; returns the newly safe text. Sets `stopped` when a stop sequence appears
        (the text up to it is returned, the stop sequence and what follows never are)."""
        self.ids.append(int(token))
        text = self._text()
        hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(text, min(hits))
        safe = len(text)
        while safe > self.sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        # The longest tail that some stop sequence starts with.
        hold = max((n for s in self.stop for n in range(1, min(len(s), safe - self.sent + 1))
                    if text[safe - n : safe] == s[:n]), default=0)  # fmt: skip
        return self._advance(text, safe - hold)

    def flush(self) -> str:
        """At the end (length or EOS): whatever was held back."""
        return "" if self.stopped else self._advance(self._text(), None)

    def _advance(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
