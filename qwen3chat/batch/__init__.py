"""The batched engine the server runs on (continuous batching over a paged KV cache).

- sequence.py: one request's state (its ids, blocks, and reply).
- block_manager.py: the KV cache's blocks: who holds which, and the prefix cache.
- scheduler.py: which sequences run in a step, and how many tokens each (preemption).
- model_runner.py: a step's rows as one PagedBatch, through the model in one forward.
- engine.py: steps in, each sequence's events out; adding and cancelling requests.
"""
