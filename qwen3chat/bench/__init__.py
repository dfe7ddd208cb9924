"""`qwen3chat bench`, in parts; callers import from the submodules.

- ``run``: settings and parsing, the timed runs, memory measurements, the bandwidth probe
  and roofline, loading the bench model, and ``run_bench`` over every combination.
- ``ops``: ``--ops`` micro-benchmarks of each layer's building blocks, and ``--profile``.
- ``plot``: ``--plot``, decode tokens/s against context depth as a PNG (Pillow).
- ``report``: the JSON report and the Rich tables.
"""
