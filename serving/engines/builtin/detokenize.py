"""Token ids -> text deltas, as they are generated, with stop sequences.

Byte-level BPE can split one character over several tokens, so text is only released once
it decodes cleanly; and text that might be the start of a stop sequence is held back until
it is clear whether the sequence follows.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: list[str] | None = None, *, window: int = 8, keep_stop: bool = False):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.keep_stop = keep_stop  # the text ends with the stop sequence found (include_stop_str_in_output)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, up to a stop sequence
        self.sent = 0  # characters of self.text already released
        self.stopped = False  # a stop sequence was found
        self._prefix_ids: list[int] = []  # ids whose text is final, kept short for speed
        self._prefix_text = ""
        self._window = window

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text that can be released now (maybe '')."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        tail_ids = self.ids[len(self._prefix_ids):]
        tail = self.tokenizer.decode(tail_ids, skip_special_tokens=True)
        if tail.endswith("\ufffd"):
            return ""  # an unfinished multi-byte character: wait for the next token
        full = self._prefix_text + tail
        if len(tail_ids) > self._window:  # decoding stays O(window), not O(answer length)
            self._prefix_ids = list(self.ids)
            self._prefix_text = full
        self.text = full
        return self._release(final=False)

    def finish(self) -> str:
        """The end of generation: release what was held back."""
        if not self.stopped and self.ids:  # also when every token so far was part of an unfinished character
            full = self._prefix_text + self.tokenizer.decode(self.ids[len(self._prefix_ids):], skip_special_tokens=True)
            self.text = full
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        search_from = max(0, self.sent - self.holdback)
        cut = None
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at != -1 and (cut is None or at < cut[0]):
                cut = (at, at + len(s))
        if cut is not None:
            self.stopped = True
            self.text = self.text[:cut[1] if self.keep_stop else cut[0]]
            final = True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.holdback)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta
