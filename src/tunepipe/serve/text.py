"""Token ids -> text pieces as they arrive, cut at the request's `stop` strings.

The whole answer is decoded again at each token and only the new tail is handed out: byte-level
BPE tokens can split a UTF-8 character, and decoding token by token would emit broken
characters. Text that could still turn into a stop string is held back until it cannot,
so a stream never shows a stop string or what follows it.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded answer already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The next piece of text to send (maybe empty); sets `stopped` when a stop string appeared."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a character: wait for the rest of its bytes
            return ""
        for stop in self.stop:
            at = text.find(stop)
            if at >= 0:
                self.stopped = True
                return self._take(text[:at])
        return self._take(text[: len(text) - self._held(text)])

    def flush(self) -> str:
        """What was held back, once the answer ended without a stop string."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text)

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-k:]):
                    longest = k
                    break
        return longest

    def _take(self, upto: str) -> str:
        piece = upto[self.sent:] if len(upto) > self.sent else ""
        self.sent = max(self.sent, len(upto))
        return piece
