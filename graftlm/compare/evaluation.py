"""The held-out measurements of one system: accuracy and answer-token NLL on a task, perplexity on text.

An `EvalSet` is built once per compare run (the same examples for every system): a task's examples with
their natural training texts (for the answer NLL), or blocks of held-out plain text (for perplexity).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from graftlm.compare.spec import EvalSpec
from graftlm.recipes.data import IGNORE_INDEX, TrainingText, encode_text


@dataclass
class EvalSet:
    spec: EvalSpec
    task: Any = None
    examples: list = field(default_factory=list)  # the task's examples, in scoring order
    texts: list[TrainingText] = field(default_factory=list)  # their natural targets (answer NLL)
    blocks: list[list[int]] = field(default_factory=list)  # perplexity: token blocks of max_length

    @property
    def questions(self) -> set[str]:
        """What identifies an example's question (a few-shot prompt's question, else its prompt)."""
        return {question_of(e) for e in self.examples}


def question_of(example: Any) -> str:
    meta = getattr(example, "meta", None) or {}
    return str(meta.get("question", example.prompt))


def build_eval_set(spec: EvalSpec, tokenizer: Any) -> EvalSet:
    """The examples (or text blocks) of one evaluation, identical for every system."""
    from graftlm.recipes.data import pack_texts
    from graftlm.recipes.sources import load_rows, make_task, rows_to_texts, task_texts

    if spec.kind == "task":
        task = make_task(spec.task, spec.task_kwargs, tokenizer)
        examples = list(task.examples(spec.n, spec.seed))
        return EvalSet(spec, task, examples, task_texts(task, examples))
    source = spec.perplexity
    rows, held_out, name = load_rows(source)
    chosen = held_out if (source.eval_split or source.eval_dataset) else rows
    texts = rows_to_texts(chosen, source, tokenizer, name)
    blocks = pack_texts([t.completion for t in texts], tokenizer, spec.max_length, f"{spec.name} text")["input_ids"]
    return EvalSet(spec, blocks=list(blocks)[: spec.n])


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@torch.no_grad()
def answer_nll(model, tokenizer, texts: list[TrainingText], batch_size: int = 16) -> list[float]:
    """Per example, the mean NLL (nats) of its completion's tokens given the prompt (teacher forced).

    Left-padded batches with explicit position ids (as generation pads), logits only at the last
    positions that predict completion tokens, so the full vocabulary is never materialised per prompt token.
    """
    from graftlm.eval.generate import model_device

    encoded = [encode_text(tokenizer, text)[:2] for text in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model_device(model)
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        ids, mask = _left_padded([c[0] for c in chunk], pad)
        labels, _ = _left_padded([c[1] for c in chunk], IGNORE_INDEX)
        labels[mask == 0] = IGNORE_INDEX
        first = int((labels != IGNORE_INDEX).int().argmax(-1).min())
        keep = ids.shape[1] - first + 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits.float()
        targets = labels[:, -keep + 1:].to(device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                reduction="none")
        counted = (targets != IGNORE_INDEX).sum(-1).clamp(min=1)
        out += (nll.sum(-1) / counted).tolist()
    return out


@torch.no_grad()
def block_nll(model, blocks: list[list[int]]) -> list[float]:
    """Per text block, the mean next-token NLL (nats) over its positions."""
    from graftlm.eval.generate import model_device

    device = model_device(model)
    out = []
    for block in blocks:
        ids = torch.tensor([block], device=device)
        out.append(float(model(input_ids=ids, labels=ids).loss))
    return out


def measure(model, tokenizer, eval_set: EvalSet, progress: bool = True) -> dict[str, Any]:
    """One system's result on one evaluation: per-example scores plus summary figures."""
    from graftlm.eval import evaluate

    started = time.perf_counter()
    spec = eval_set.spec
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        if spec.kind == "perplexity":
            nll = block_nll(model, eval_set.blocks)
            mean = sum(nll) / len(nll)
            return {"kind": "perplexity", "n": len(nll), "block_nll": nll, "nll": mean, "perplexity": math.exp(mean),
                    "wall_s": time.perf_counter() - started}
        result = evaluate(model, tokenizer, eval_set.task, n=spec.n, seed=spec.seed, batch_size=spec.batch_size,
                          max_new_tokens=spec.max_new_tokens, progress=progress)
        nll = answer_nll(model, tokenizer, eval_set.texts, spec.batch_size)
    finally:
        model.train(was_training)
    correct = [bool(r["correct"]) for r in result["records"]]
    return {"kind": "task", "n": len(correct), "correct": correct, "accuracy": sum(correct) / len(correct),
            "answer_nll": nll, "mean_answer_nll": sum(nll) / len(nll),
            "completions": [r["completion"] for r in result["records"]], "wall_s": time.perf_counter() - started}
