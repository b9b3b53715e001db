"""Why a trained replace-mode Echo graft does or does not recall (issue 15): per-layer statistics.

    python3 benchmarks/echo_diagnose.py [--adapter DIR ...] [--fresh '{"mode": "replace", ...}' ...] [--model smollm2-135m]
        [--task-kwargs '{"num_pairs": 16, "num_queries": 4, "gap": 512, "value_digits": 3}'] [--n 24]
        [--grad-n 8] [--ablate-n 0] [--out out/echo_diagnose]

For each saved adapter (one replace-mode Echo graft, possibly stacked with a LoRA) and each fresh graft
(``--fresh``: EchoConfig fields; W_o = 0, so Echo adds nothing yet), on ``--n`` MQAR examples
of the given kind (seed 1000: not the compare's held-out seed 0) and per replaced layer:

1. **What the layer's output misses and what Echo adds** (`EchoGraft.observe_layers`), at every position and
   at the positions that predict an answer token. With T = o_proj(full attention) of the frozen layer,
   W = o_proj(window attention) and E = echo(x), each [B, T, d] on the trained model's own residual stream:
   ``window error`` = ||W - T|| / ||T||, ``with Echo`` = ||W + E - T|| / ||T||, ``gap closed`` =
   1 - ||W + E - T||^2 / ||W - T||^2 (negative: Echo makes the layer's output worse), ``cos`` = cos(E, T - W)
   and ``|E| / |T - W|``.
2. **Where the gradient goes**: on ``--grad-n`` examples of the training kind (32 pairs, gap 256), the norm of
   the gradient of the LM loss and, separately, of the distillation loss (`EchoGraft.loss_terms`) with
   respect to each layer's Echo parameters, beside the parameters' own norm (||W_o||, mean gamma, mean eta).
3. **Which layers' Echo matters** (``--ablate-n`` > 0): the mean answer NLL with one layer's Echo
   silenced (its W_o zeroed) minus the answer NLL with every layer's Echo on, on ``--ablate-n`` examples.

Writes ``diagnose.json`` and ``diagnose.md`` under ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graftlm.adapters import attach_adapter
from graftlm.adapters.echo import EchoConfig, EchoGraft
from graftlm.compare.evaluation import answer_nll
from graftlm.models import load_model
from graftlm.recipes.data import IGNORE_INDEX, encode_text
from graftlm.recipes.sources import make_task, task_texts

EVAL_KWARGS = {"num_pairs": 16, "num_queries": 4, "gap": 512, "value_digits": 3}
TRAIN_KWARGS = {"num_pairs": 32, "num_queries": 4, "gap": 256, "value_digits": 3}
SEED = 1000


@dataclass
class LayerSums:
    """Sums over positions of squared norms and dot products, [d]-vectors reduced per position."""

    teacher: float = 0.0  # sum ||T||^2
    gap: float = 0.0  # sum ||T - W||^2
    echo: float = 0.0  # sum ||E||^2
    residual: float = 0.0  # sum ||W + E - T||^2
    dot: float = 0.0  # sum <E, T - W>
    positions: int = 0

    def add(self, teacher: torch.Tensor, window: torch.Tensor, echo: torch.Tensor | None) -> None:
        """teacher, window, echo: [N, d] rows of the chosen positions."""
        teacher, window = teacher.double(), window.double()
        echo = torch.zeros_like(teacher) if echo is None else echo.double()
        gap = teacher - window
        self.teacher += float(teacher.pow(2).sum())
        self.gap += float(gap.pow(2).sum())
        self.echo += float(echo.pow(2).sum())
        self.residual += float((gap - echo).pow(2).sum())
        self.dot += float((echo * gap).sum())
        self.positions += teacher.shape[0]

    def summary(self) -> dict[str, float]:
        safe = lambda a, b: a / b if b > 0 else float("nan")
        return {
            "window_error": math.sqrt(safe(self.gap, self.teacher)),
            "with_echo_error": math.sqrt(safe(self.residual, self.teacher)),
            "gap_closed": 1.0 - safe(self.residual, self.gap),
            "cos": safe(self.dot, math.sqrt(self.echo * self.gap)) if self.echo > 0 else 0.0,
            "echo_over_gap": math.sqrt(safe(self.echo, self.gap)),
            "positions": self.positions,
        }


@dataclass
class Observed:
    every: dict[int, LayerSums] = field(default_factory=dict)
    answer: dict[int, LayerSums] = field(default_factory=dict)
    rows: torch.Tensor | None = None  # [T] bool: the positions predicting an answer token

    def __call__(self, index: int, teacher: torch.Tensor, window: torch.Tensor, echo: torch.Tensor | None) -> None:
        flat = lambda t: None if t is None else t.reshape(-1, t.shape[-1])
        self.every.setdefault(index, LayerSums()).add(flat(teacher), flat(window), flat(echo))
        pick = lambda t: None if t is None else t[0, self.rows]
        self.answer.setdefault(index, LayerSums()).add(pick(teacher), pick(window), pick(echo))


def echo_graft(model) -> EchoGraft:
    found = [g for g in model.grafts.values() if isinstance(g, EchoGraft)]
    if len(found) != 1 or not found[0].replaces:
        raise SystemExit(f"expected one replace-mode Echo graft, found {[type(g).__name__ for g in model.grafts.values()]}")
    return found[0]


def encoded(tokenizer, kwargs: dict, n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    task = make_task("mqar", kwargs, tokenizer)
    return [encode_text(tokenizer, text)[:2] for text in task_texts(task, task.examples(n, seed))]


@torch.no_grad()
def observe(model, graft: EchoGraft, examples) -> dict[str, dict[int, dict[str, float]]]:
    observed = Observed()
    with graft.observe_layers(observed):
        for ids, labels in examples:
            targets = torch.tensor(labels)
            observed.rows = torch.zeros(len(ids), dtype=torch.bool)
            observed.rows[:-1] = targets[1:] != IGNORE_INDEX  # position t predicts token t + 1
            model(input_ids=torch.tensor([ids]))
    return {"every position": {i: s.summary() for i, s in sorted(observed.every.items())},
            "answer-predicting positions": {i: s.summary() for i, s in sorted(observed.answer.items())}}


def gradients(model, graft: EchoGraft, examples) -> dict[int, dict[str, float]]:
    """Per layer: the gradient norms of the LM and distillation losses over ``examples`` (summed per example)."""
    branches = {int(i): list(b.parameters()) for i, b in graft.branches.items()}
    flat = [p for params in branches.values() for p in params]
    squares = {i: {"lm": 0.0, "distill": 0.0} for i in branches}
    was_training = model.training
    model.train()
    try:
        for ids, labels in examples:
            batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
            lm_loss, distill = graft.loss_terms(model, batch)
            for name, loss in (("lm", lm_loss), ("distill", distill)):
                grads = torch.autograd.grad(loss, flat, retain_graph=name == "lm", allow_unused=True)
                at = 0
                for i, params in branches.items():
                    for g in grads[at:at + len(params)]:
                        if g is not None:
                            squares[i][name] += float(g.pow(2).sum())
                    at += len(params)
    finally:
        model.train(was_training)
    out = {}
    for i, branch in sorted(graft.branches.items(), key=lambda kv: int(kv[0])):
        out[int(i)] = {"grad_lm": math.sqrt(squares[int(i)]["lm"] / len(examples)),
                       "grad_distill": math.sqrt(squares[int(i)]["distill"] / len(examples)),
                       "w_o_norm": float(branch.w_o.weight.detach().norm()),
                       "gamma": float(branch.gamma.detach().mean()), "eta": float(branch.eta.detach().mean())}
    return out


@contextmanager
def silenced(branches):
    """Echo off in ``branches`` (their W_o zeroed) inside the context; restored after."""
    saved = [branch.w_o.weight.clone() for branch in branches]
    for branch in branches:
        branch.w_o.weight.zero_()
    try:
        yield
    finally:
        for branch, weight in zip(branches, saved):
            branch.w_o.weight.copy_(weight)


@torch.no_grad()
def ablation(model, tokenizer, graft: EchoGraft, kwargs: dict, n: int) -> dict[str, object]:
    task = make_task("mqar", kwargs, tokenizer)
    texts = task_texts(task, task.examples(n, SEED))

    def score() -> float:
        nll = answer_nll(model, tokenizer, texts, batch_size=4)
        return sum(nll) / len(nll)

    every = score()
    rises = {}
    for i, branch in sorted(graft.branches.items(), key=lambda kv: int(kv[0])):
        with silenced([branch]):
            rises[int(i)] = score() - every
    with silenced(list(graft.branches.values())):
        none = score()
    return {"answer_nll_all_on": every, "answer_nll_all_off": none, "rise_one_off": rises}


def markdown(name: str, result: dict) -> str:
    lines = [f"### {name}", "", (f"adapter `{result['adapter']}`, {result['n']} MQAR examples "
                                 f"{json.dumps(result['task_kwargs'])} (seed {SEED}); gradients on "
                                 f"{result['grad_n']} training-kind examples {json.dumps(TRAIN_KWARGS)}"), ""]
    every, answer = result["observed"]["every position"], result["observed"]["answer-predicting positions"]
    grads, rises = result["gradients"], (result.get("ablation") or {}).get("rise_one_off", {})
    header = ("| layer | window error | with Echo | gap closed | cos(E, T-W) | E/(T-W) | at answers: window error "
              "| with Echo | gap closed | cos | grad LM | grad distill | W_o norm | gamma | eta |")
    if rises:
        header += " answer NLL rise, this layer's Echo off |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for i in every:
        e, a, g = every[i], answer[i], grads.get(i, {})
        row = (f"| {i} | {e['window_error']:.3f} | {e['with_echo_error']:.3f} | {e['gap_closed']:+.3f} | {e['cos']:+.3f} "
               f"| {e['echo_over_gap']:.3f} | {a['window_error']:.3f} | {a['with_echo_error']:.3f} | "
               f"{a['gap_closed']:+.3f} | {a['cos']:+.3f} | {g.get('grad_lm', float('nan')):.2e} | "
               f"{g.get('grad_distill', float('nan')):.2e} | {g.get('w_o_norm', float('nan')):.3f} | "
               f"{g.get('gamma', float('nan')):.3f} | {g.get('eta', float('nan')):.3f} |")
        if rises:
            row += f" {rises[i]:+.3f} |"
        lines.append(row)
    if result.get("ablation"):
        ab = result["ablation"]
        lines += ["", (f"Answer NLL with every layer's Echo on {ab['answer_nll_all_on']:.3f}, with every layer's "
                       f"Echo off {ab['answer_nll_all_off']:.3f} ({result['ablate_n']} examples).")]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", nargs="+", default=[], help="saved adapter directories (a replace-mode Echo)")
    parser.add_argument("--fresh", nargs="+", type=json.loads, default=[], metavar="JSON",
                        help="EchoConfig fields of fresh (untrained, W_o = 0) replace-mode grafts to diagnose too")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task-kwargs", type=json.loads, default=EVAL_KWARGS)
    parser.add_argument("--n", type=int, default=24, help="examples for the per-layer output statistics")
    parser.add_argument("--grad-n", type=int, default=8, help="training-kind examples for the gradient norms")
    parser.add_argument("--ablate-n", type=int, default=0, help="examples for the one-layer-off ablation (0: skip)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="out/echo_diagnose")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.adapter and not args.fresh:
        parser.error("give --adapter or --fresh")
    results, sections = {}, []
    for adapter in args.adapter + args.fresh:
        start = time.perf_counter()
        base, tokenizer = load_model(args.model)
        fresh = isinstance(adapter, dict)
        source = EchoConfig(**adapter) if fresh else adapter
        model = attach_adapter(base, source, is_trainable=True)  # trainable: the gradients below need it
        adapter = f"fresh {json.dumps(adapter, sort_keys=True)}" if fresh else adapter
        model.eval()
        graft = echo_graft(model)
        result = {"adapter": adapter, "task_kwargs": args.task_kwargs, "n": args.n, "grad_n": args.grad_n,
                  "ablate_n": args.ablate_n}
        result["observed"] = observe(model, graft, encoded(tokenizer, args.task_kwargs, args.n, SEED))
        result["gradients"] = gradients(model, graft, encoded(tokenizer, TRAIN_KWARGS, args.grad_n, SEED))
        if args.ablate_n:
            result["ablation"] = ablation(model, tokenizer, graft, args.task_kwargs, args.ablate_n)
        result["seconds"] = time.perf_counter() - start
        results[adapter] = result
        sections.append(markdown("fresh graft" if fresh else Path(adapter).parent.name or adapter, result))
        (out / "diagnose.json").write_text(json.dumps(results, indent=1))
    text = "\n\n".join(sections)
    (out / "diagnose.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
