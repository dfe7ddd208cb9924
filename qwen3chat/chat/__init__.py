"""Talking to the model: one-shot answers for scripts, the interactive REPL for people."""
