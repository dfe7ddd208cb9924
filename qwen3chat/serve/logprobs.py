"""Token log-probabilities in the OpenAI shapes: the chat API's ``logprobs.content``
entries, and the legacy completions API's parallel lists (with text offsets)."""

from __future__ import annotations

from ..generation import TokenLogprob
from ..tokenizer import Tokenizer


class LogprobsFormat:
    """Formats a reply's TokenLogprobs, in order, chunk by chunk (a completion's text
    offsets run on from the previous chunk's)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool):
        self.tokenizer = tokenizer
        self.chat = chat
        self.offset = 0

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _entry(self, token: int, logprob: float) -> dict:
        text = self._text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def __call__(self, entries: list[TokenLogprob]) -> dict:
        if self.chat:
            return {
                "content": [
                    {
                        **self._entry(e.token, e.logprob),
                        "top_logprobs": [self._entry(t, lp) for t, lp in e.top],
                    }
                    for e in entries
                ]
            }
        tokens = [self._text(e.token) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self._text(t): lp for t, lp in e.top} for e in entries],
            "text_offset": offsets,
        }
