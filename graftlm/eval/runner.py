"""Evaluate a generating model on a task (``evaluate``), over one swept parameter (``sweep``), and the
``graftlm eval`` command-line hook (``add_eval_arguments``, ``run_eval_cli``)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from graftlm.eval.generate import generate_all
from graftlm.eval.scoring import accuracy, accuracy_by, score_completions
from graftlm.eval.tasks import Task, get_task, parse_task_value, task_accepts

PROMPT_CHARS_KEPT = 1500


def _shorten(text: str, keep: int = PROMPT_CHARS_KEPT) -> str:
    """Returns ``text``, or its start and end around a marker of how much was left out."""
    if len(text) <= keep:
        return text
    half = keep // 2
    return f"{text[:half]} [... {len(text) - keep} characters ...] {text[-half:]}"


def build_task(task_name: str, task_kwargs: Mapping[str, Any] | None, tokenizer: Any) -> Task:
    """Returns the named task, given ``tokenizer`` too when the task measures lengths in tokens."""
    kwargs = dict(task_kwargs or {})
    if "tokenizer" not in kwargs and task_accepts(task_name, "tokenizer"):
        kwargs["tokenizer"] = tokenizer
    return get_task(task_name, **kwargs)


def apply_chat_template(tokenizer: Any, prompt: str) -> str:
    """Returns ``prompt`` as a single user turn in the tokenizer's chat template, ready for the reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def evaluate(model: Any, tokenizer: Any, task_name: str | Task, task_kwargs: Mapping[str, Any] | None = None,
             n: int = 50, seed: int = 0, batch_size: int = 8, max_new_tokens: int | None = None,
             chat: bool = False, progress: bool = True) -> dict[str, Any]:
    """Returns the exact-match evaluation of ``model`` (anything with a transformers-style ``generate``)
    on ``n`` seeded examples of a task: accuracy, counts, per-group breakdowns, timing and one record per
    example (prompts shortened). ``chat`` wraps each prompt in the tokenizer's chat template."""
    if isinstance(task_name, Task):
        task, name = task_name, task_name.name
    else:
        task, name = build_task(task_name, task_kwargs, tokenizer), task_name
    started = time.perf_counter()
    examples = task.examples(n, seed)
    prompts = [apply_chat_template(tokenizer, e.prompt) if chat else e.prompt for e in examples]
    new_tokens = max_new_tokens or task.max_new_tokens
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        completions = generate_all(model, tokenizer, prompts, new_tokens, batch_size=batch_size,
                                   stop_at_newline=task.stop_at_newline, progress=progress, description=name)
    finally:
        if was_training:
            model.train()
    records = score_completions(task, examples, completions)
    for record in records:
        record["prompt"] = _shorten(record["prompt"])
    return {
        "task": name,
        "task_kwargs": {k: v for k, v in (task_kwargs or {}).items() if k != "tokenizer"},
        "task_params": task.params(),
        "n": len(records),
        "seed": seed,
        "chat": chat,
        "max_new_tokens": new_tokens,
        "accuracy": accuracy(records),
        "num_correct": sum(bool(r["correct"]) for r in records),
        "breakdown": {key: accuracy_by(records, key) for key in task.breakdown_keys},
        "wall_s": round(time.perf_counter() - started, 3),
        "records": records,
    }


def sweep(model: Any, tokenizer: Any, task_name: str, param: str, values: Sequence[Any],
          task_kwargs: Mapping[str, Any] | None = None, **evaluate_kwargs: Any) -> dict[str, Any]:
    """Returns ``evaluate`` at each value of one task parameter: the values, their accuracies, and the full
    result of each point under "points"."""
    points = []
    for value in values:
        kwargs = {**(task_kwargs or {}), param: value}
        points.append(evaluate(model, tokenizer, task_name, kwargs, **evaluate_kwargs))
    return {"task": task_name, "task_kwargs": dict(task_kwargs or {}), "param": param, "values": list(values),
            "accuracies": [p["accuracy"] for p in points], "points": points}


# -- command line --------------------------------------------------------------------------------------
def parse_key_value(text: str) -> tuple[str, Any]:
    """Returns ``(key, value)`` from "key=value", the value typed by ``parse_task_value``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), parse_task_value(value)


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """Returns ``(param, values)`` from "param=v1,v2,...", each value typed by ``parse_task_value``."""
    key, sep, values = text.partition("=")
    items = [v for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise argparse.ArgumentTypeError(f"expected param=v1,v2,..., got {text!r}")
    return key.strip(), [parse_task_value(v) for v in items]


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the ``graftlm eval`` options to ``parser``; returns it."""
    parser.add_argument("--model", default="smollm2-135m", help="embedded checkpoint name or a local path")
    parser.add_argument("--adapter", default=None, help="path of a saved adapter to attach before scoring")
    parser.add_argument("--task", default="mqar",
                        help="task name: mqar, needle, chain_sum, basic_arithmetic, products, gcd, "
                             "letter_counting, leg_counting, spell_backward")
    parser.add_argument("--task-arg", dest="task_args", action="append", type=parse_key_value, default=[],
                        metavar="KEY=VALUE", help="a task parameter (repeatable), e.g. num_pairs=8, difficulty=2")
    parser.add_argument("--n", type=int, default=50, help="number of examples (per sweep point)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated examples")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's own")
    parser.add_argument("--sweep", type=parse_sweep, default=None, metavar="PARAM=V1,V2,...",
                        help="evaluate at each value of one task parameter, e.g. context_length=256,512,1024")
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the tokenizer's chat template (the few-shot "
                             "prompts are written for plain completion; SmolLM2-135M scores ~0%% with this)")
    parser.add_argument("--label", default=None, help="the system's name in the report (default: model+adapter)")
    parser.add_argument("--out", default="out/eval", help="directory for the JSON, markdown and PNG report")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def run_eval_cli(args: argparse.Namespace, load_model_fn: Callable[[str], tuple[Any, Any]],
                 load_adapter_fn: Callable[[Any, str], Any] | None = None) -> int:
    """Runs ``graftlm eval``: loads the model with ``load_model_fn(name_or_path) -> (model, tokenizer)``,
    attaches ``--adapter`` with ``load_adapter_fn(model, path) -> model``, evaluates or sweeps, writes the
    report under ``--out`` and prints its table; returns the exit status 0."""
    from graftlm.eval.report import markdown_table, write_report
    from graftlm.eval.tasks import available_tasks

    if args.task not in available_tasks():
        raise SystemExit(f"graftlm eval: unknown task {args.task!r}; available: {', '.join(available_tasks())}")
    if args.adapter and load_adapter_fn is None:
        raise SystemExit("graftlm eval: --adapter was given but this command was built without an adapter "
                         "loader (run_eval_cli needs load_adapter_fn)")
    model, tokenizer = load_model_fn(args.model)
    if args.adapter:
        model = load_adapter_fn(model, args.adapter)
    task_kwargs = dict(args.task_args)
    common = {"n": args.n, "seed": args.seed, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "chat": args.chat, "progress": args.progress}
    try:
        if args.sweep:
            param, values = args.sweep
            result = sweep(model, tokenizer, args.task, param, values, task_kwargs, **common)
        else:
            result = evaluate(model, tokenizer, args.task, task_kwargs, **common)
    except ValueError as error:
        raise SystemExit(f"graftlm eval: {error}") from error
    label = args.label or (f"{args.model} + {args.adapter}" if args.adapter else args.model)
    result["system"] = label
    name = f"{args.task}_sweep_{args.sweep[0]}" if args.sweep else args.task
    paths = write_report(result, args.out, name=name, label=label)
    print(f"{label}\n\n{markdown_table(result)}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
