"""The frozen base's loss on a task's training targets, old target vs the natural one (issue 12).

Old target (before the fix): the prompt tokenized alone, the answer tokenized alone (no space before it),
then EOS. Natural target: ``prompt + task.answer_prefix + answer + newline`` tokenized as one text, the
loss on the tokens after the prompt. Mean answer-token loss (nats) over ``--n`` training examples, per
position (first token, the rest, the ending), on each embedded checkpoint.

    python3 benchmarks/answer_loss.py [--models smollm2-135m gemma-3-270m] [--task basic_arithmetic]
                                      [--difficulty 1] [--n 200] [--out out/answer_loss]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def token_losses(model, input_ids: list[int], labels: list[int]) -> list[float]:
    """Per labelled token, the base's NLL (nats) of that token given everything before it."""
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    keep = targets != -100
    nll = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="none")
    return nll.tolist()


def old_target(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def summarise(per_example: list[list[float]]) -> dict[str, float]:
    flat = [x for row in per_example for x in row]
    return {"mean": sum(flat) / len(flat), "first_token": sum(r[0] for r in per_example) / len(per_example),
            "last_token": sum(r[-1] for r in per_example) / len(per_example),
            "tokens_per_answer": len(flat) / len(per_example)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    parser.add_argument("--task", default="basic_arithmetic")
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--out", default="out/answer_loss")
    args = parser.parse_args()

    from graftlm import load_model
    from graftlm.eval import get_task
    from graftlm.recipes.data import encode_text
    from graftlm.recipes.sources import task_texts

    task = get_task(args.task, difficulty=args.difficulty)
    examples = task.examples(args.n, seed=1)
    report = {"task": args.task, "difficulty": args.difficulty, "n": args.n, "models": {}}
    for name in args.models:
        model, tokenizer = load_model(name)
        old = [token_losses(model, *old_target(tokenizer, e.prompt, e.answer)) for e in examples]
        new = []
        for text in task_texts(task, examples):
            ids, labels, _ = encode_text(tokenizer, text)
            new.append(token_losses(model, ids, labels))
        report["models"][name] = {"old_target": summarise(old), "natural_target": summarise(new)}
        print(name, json.dumps(report["models"][name]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answer_loss.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [(f"Frozen base, mean answer-token loss (nats), {args.task} difficulty {args.difficulty}, "
              f"{args.n} training examples (seed 1), 3-shot prompts"), "",
             "| model | target | mean | first token | last token (EOS / newline) | tokens per answer |",
             "|---|---|---|---|---|---|"]
    for name, rows in report["models"].items():
        for label, row in (("old: answer alone + EOS", rows["old_target"]),
                           ("natural: ' ' + answer + newline", rows["natural_target"])):
            lines.append(f"| {name} | {label} | {row['mean']:.3f} | {row['first_token']:.3f} | "
                         f"{row['last_token']:.3f} | {row['tokens_per_answer']:.2f} |")
    (out / "answer_loss.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
