"""Turning generated tokens into text as they come: whole characters only, stop sequences never half-shown.

A byte-level tokenizer can split one character (an emoji, a CJK character) over several tokens; decoding
token by token would stream U+FFFD replacement characters. IncrementalDecoder waits until the bytes
form whole characters. StopMatcher holds back any tail that could still become a stop sequence, so a
client never receives text that is later cut.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the completion, so a leading space is not stripped


class IncrementalDecoder:
    """Decode a growing list of token ids into text deltas that never end inside a character.

    The window trick of Hugging Face's text-generation-inference: decode the tokens since `prefix`
    and compare with what the tokens up to `read` decoded to; decoding a short window costs little,
    and starting it a few tokens back keeps the tokenizer's context (spaces, byte fallback) right.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is still incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, incomplete characters included (as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Find stop sequences across deltas; release only text that can no longer start one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.released = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text safe to send now; after a stop sequence is found, `stopped` is True and nothing more comes."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        start = max(0, self.released - self.longest + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        return "" if self.stopped else self._release(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop sequence."""
        tail = self.text[-(self.longest - 1) :] if self.longest > 1 else ""
        for size in range(len(tail), 0, -1):
            if any(stop.startswith(tail[-size:]) for stop in self.stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self.released)
        out, self.released = self.text[self.released : end], end
        return out
