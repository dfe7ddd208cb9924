"""The one exception type that reaches the user as a one-line message."""


class QwenChatError(Exception):
    """A problem the user can fix: bad file, bad flag, model too large for the context.

    The CLI prints ``str(error)`` on one line and exits non-zero; anything else is a bug
    and keeps its traceback (shown with ``--debug``).
    """


class ContextOverflowError(QwenChatError):
    """The prompt (plus at least one new token) does not fit the KV cache."""

    def __init__(self, needed: int, capacity: int):
        super().__init__(
            f"the conversation needs {needed} tokens but --max-seq-len is {capacity}; "
            "raise --max-seq-len or shorten the prompt"
        )
        self.needed = needed
        self.capacity = capacity
