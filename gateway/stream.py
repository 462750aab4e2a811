"""One generate job's output as the HTTP client sees it: tokens deduplicated by index, text cut at stop strings.

A job whose fused worker dies is redelivered by the broker and streams again from its first token. ``Tokens.index``
(the count of tokens before the message) says which tokens are new: those below what was already taken are
dropped, so the client never sees a token twice. Redelivered output is the same token for token (greedy, or
seeded sampling: seeds are per round, ``workers.sampling``).

The text comes from the worker (``Tokens.text``, decoded incrementally where the tokenizer lives). Only when a
message straddles what was already taken (a redelivery that batched tokens differently) does the gateway decode
ids itself, and from then on for the rest of the job, so the pieces still add up to the decoded whole.

Stop strings: the text that could still turn into a stop string (the last ``max(len(stop)) - 1`` characters) is
held back until the next piece rules it out, so a stop string split across pieces is still caught and never sent.
"""
from __future__ import annotations

from typing import Sequence

from workers.tokenizer_text import IncrementalDecoder


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []  # every token taken, in order
        self.text = ""  # their text as decoded so far (before any stop cut)
        self.output = ""  # what the client has been given
        self.held = ""  # text that may be the start of a stop string
        self.stopped = False  # a stop string was found: the job should be cancelled
        self.duplicates = 0  # tokens dropped because they were already taken
        self._decoder: IncrementalDecoder | None = None

    def tokens(self, index: int, tokens: Sequence[int], text: str) -> str:
        """Take one ``Tokens`` message; return the text to send now ('' when nothing is new or all is held)."""
        if self.stopped:
            return ""
        n = len(self.ids)
        if index + len(tokens) <= n or index > n:  # already taken (a redelivery), or a gap Done will fill
            self.duplicates += max(0, min(n, index + len(tokens)) - index)
            return ""
        fresh = list(tokens[n - index:])
        if index < n:
            self.duplicates += n - index
            self._own_decoder()
        piece = self._decoder.push(fresh) if self._decoder is not None else text
        self.ids += fresh
        self.text += piece
        return self._cut(piece)

    def done(self, token_ids: Sequence[int], text: str) -> str:
        """Take the job's ``Done``: whatever it holds beyond what was streamed, then everything still held."""
        if self.stopped:
            return ""
        n = len(self.ids)
        fresh = list(token_ids[n:])
        if self._decoder is None and text.startswith(self.text):
            piece = text[len(self.text):]
        else:
            self._own_decoder()
            piece = self._decoder.push(fresh) + self._decoder.flush()
        self.ids += fresh
        self.text += piece
        return self._cut(piece, final=True)

    def _own_decoder(self) -> None:
        if self._decoder is None:
            self._decoder = IncrementalDecoder(self.tokenizer)
            self._decoder.ids = list(self.ids)
            self._decoder.emitted = self.text

    def _cut(self, piece: str, final: bool = False) -> str:
        if not self.stop:
            self.output += piece
            return piece
        self.held += piece
        cut = min((i for i in (self.held.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, self.held, self.stopped = self.held[:cut], "", True
        elif final:
            out, self.held = self.held, ""
        else:
            keep = len(self.held) - self.hold
            out, self.held = (self.held[:keep], self.held[keep:]) if keep > 0 else ("", self.held)
        self.output += out
        return out
