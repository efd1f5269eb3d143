"""Training-quality benchmark: four fully local LoRA fine-tuning tasks; every optimizer gets the
same lr search and is reported over several seeds, tuned and as shipped, with ablations.

    python -m benchmarks.bench_quality [--quick]

Modules: ``tasks`` (the tasks), ``contenders`` (the optimizers, run configurations, the
step-length rule), ``search`` (the lr search), ``ablation`` (technique tables), ``runner`` (one
training run, worker processes), ``protocol`` (what runs, dedupe, scheduling, cost estimate),
``summary`` (metrics derived from the results), ``report`` (markdown and plots).
"""
