"""Training-quality benchmark: four fully local LoRA fine-tuning tasks, every optimizer tuned
by the same small lr grid and reported over several seeds.

    python -m benchmarks.bench_quality [--quick]

``run(...)`` returns the results dict (written to ``benchmarks/results/quality.json`` by the
entry point); ``render_markdown(results)`` turns it into the section of docs/benchmarks.md.
See ``runner.py`` for the protocol and metric definitions, ``tasks.py`` for the tasks and
``contenders.py`` for how each optimizer is configured.
"""
from .report import plot_all, render_markdown  # noqa: F401
from .runner import run_task  # noqa: F401
