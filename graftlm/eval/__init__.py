"""Evaluation harness: seeded tasks with exact answers, batched greedy generation, exact-match scoring,
and reports (JSON, markdown, PNG). Scores anything with a transformers-style ``generate``.

    from graftlm.eval import evaluate, sweep, write_report
    result = evaluate(model, tokenizer, "mqar", {"num_pairs": 4}, n=20)
    curve = sweep(model, tokenizer, "needle", "context_length", [256, 512, 1024], n=10)
"""

from graftlm.eval.generate import generate_all, generate_batch
from graftlm.eval.mqar import mqar_token_sequences
from graftlm.eval.report import comparison_table, markdown_table, plot_sweeps, write_comparison, write_report
from graftlm.eval.runner import add_eval_arguments, evaluate, run_eval_cli, sweep
from graftlm.eval.scoring import accuracy, accuracy_by, score_completions
from graftlm.eval.tasks import Example, Task, available_tasks, get_task, register_task

__all__ = [
    "Example", "Task", "accuracy", "accuracy_by", "add_eval_arguments", "available_tasks", "comparison_table",
    "evaluate", "generate_all", "generate_batch", "get_task", "markdown_table", "mqar_token_sequences",
    "plot_sweeps", "register_task", "run_eval_cli", "score_completions", "sweep", "write_comparison",
    "write_report",
]
