"""Draft tokens for speculative decoding by prompt lookup (``--draft ngram``).

A reply often repeats what came before it: code being edited, a quoted passage, a
summary's names, a list's pattern. When the last few tokens occurred earlier in the
conversation, the tokens that followed them then are a guess at what follows now. The
engine runs the guesses through the model in one forward pass with the pending token,
keeps each guess the model would have chosen itself and stops at the first it would not
(engine.py), so the reply is exactly the one decoding token by token gives; a right guess
costs a row of a pass that reads the weights once for all its rows instead of a pass of
its own. (llama.cpp's ``--spec-type ngram-simple``, vLLM's ``ngram`` method and
transformers' ``prompt_lookup_num_tokens`` draft the same way.)
"""

from __future__ import annotations

from torch import nn


def drafts_per_pass(model: nn.Module, draft_max: int, recurrent: bool) -> int:
    """The most guesses a pass carries with ``draft_max`` asked for: none where recurrent
    layers cannot step back past a wrong guess, and no more than leave every row of the
    pass the bits of a one-row step (the model's ``step_order_rows``: a product that adds a
    pass's rows in another order than one row's can move a greedy choice). 0: no drafting."""
    if recurrent or not draft_max:
        return 0
    return min(draft_max, model.step_order_rows() - 1)


class NgramDrafter:
    """Each n-gram of ``ngrams`` sizes seen so far (the prompt, then every token the reply
    chooses) mapped to where its latest occurrence ended, so that drafting costs a
    dictionary lookup per size, not a search of the history. The longest n-gram that ends
    the history and occurred before wins: longer matches guess better."""

    def __init__(self, ids: list[int], max_draft: int, ngrams: range = range(4, 1, -1)):
        self.max_draft = self.length = max_draft
        self.ngrams = ngrams
        self.history: list[int] = []
        self.seen: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in ngrams}
        for token in ids:
            self.add(token)

    def add(self, token: int) -> None:
        """``token`` follows the history. The n-grams that end just before it are indexed
        now, as they have a continuation (the history's own last n-gram, which is looked
        up, must not find itself)."""
        history = self.history
        end = len(history)
        for n, seen in self.seen.items():
            if end >= n:
                seen[tuple(history[end - n :])] = end
        history.append(token)

    def kept(self, count: int) -> None:
        """``count`` tokens of the last draft were right: the next draft may be one more
        than twice as long (up to max_draft). A pass costs more with each draft (on the
        0.6B shape 1.1x a decode step with one, 1.8x with seven), so long drafts pay only
        where most guesses are right; a run of right guesses grows them back."""
        self.length = min(self.max_draft, 2 * count + 1)

    def propose(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens (and the length the last draft earned) that followed the
        latest earlier occurrence of the longest n-gram ending the history; none if there
        is none."""
        limit = min(limit, self.length)
        history = self.history
        if limit <= 0:
            return []
        for n in self.ngrams:
            found = self.seen[n].get(tuple(history[-n:])) if len(history) >= n else None
            if found is not None:
                return history[found : found + limit]
        return []
