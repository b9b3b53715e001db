"""Side-by-side experiments: train several systems on the same data, steps, seed and budget, score them on
the same held-out examples, and report intervals and paired tests (``graftlm compare SPEC.yaml``).

    from graftlm.compare import load_compare_spec, run_compare
    report = run_compare(load_compare_spec("benchmarks/compare/sst.yaml"))
"""

from graftlm.compare.runner import run_compare
from graftlm.compare.spec import CompareSpec, EvalSpec, SystemSpec, build_compare_spec, load_compare_spec
from graftlm.compare.stats import bootstrap_interval, mcnemar_exact, paired_bootstrap, wilson_interval

__all__ = [
    "CompareSpec", "EvalSpec", "SystemSpec", "bootstrap_interval", "build_compare_spec", "load_compare_spec",
    "mcnemar_exact", "paired_bootstrap", "run_compare", "wilson_interval",
]
