"""Contraction of the Attractor head's map on a real checkpoint (issue 14; METHODS.md section 2): the
measurement behind `AttractorConfig.gamma_max`.

    python3 benchmarks/attractor_contraction.py [--model smollm2-135m] [--batch 4] [--seq 64]
                                                [--adapter DIR ...] [--threads 1]

``c`` [B, T, d] is the backbone's last hidden state (the final norm's input) on real text (the GPL-3 text
shipped in /usr/share/common-licenses). For the map g(y; c) of a head it reports, per sequence:

* rho: the spectral norm of the Jacobian J = dg/dy at y = c (20 steps of power iteration on J^T J with
  forward- and reverse-mode products), the local contraction rate; the solve converges geometrically
  like rho^k when rho < 1, and the exact adjoint obeys ||u|| <= ||v|| / (1 - rho);
* first-guess residual: max over positions of ||g(c) - c|| / ||c|| (the solver's per-position criterion).

Heads measured: the exact fresh head (output projections zero: g(y; c) = c, rho = 0), and "opened"
heads: output projections drawn N(0, std^2) for std in --stds (init_std 0.02 is the scale of the input
projections), with every gate at gamma_init (0.1) and fully open at gamma_max, for each gamma_max in
--gamma-max. ``--adapter``: trained attractor adapters (e.g. a compare run's ``.../run/adapter``), measured
as they are. Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from graftlm import AttractorConfig, attach_adapter, load_model
from graftlm.adapters.attractor import attention_mask

TEXT = Path("/usr/share/common-licenses/GPL-3")


def real_text_ids(tokenizer, batch: int, seq: int) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[0]
    if ids.numel() < batch * seq:
        raise SystemExit(f"{TEXT} has {ids.numel()} tokens, fewer than batch x seq = {batch * seq}")
    return ids[: batch * seq].view(batch, seq)


def last_hidden(model, graft, ids: torch.Tensor) -> torch.Tensor:
    """c [B, T, d]: the backbone's first guess (with the graft's backbone LoRA, if any), read at the final
    norm with a solve of 0 updates (y = c)."""
    seen = {}
    norm = graft.patch.final_norm(graft.base_model)
    handle = norm.register_forward_pre_hook(lambda module, args: seen.setdefault("c", args[0].detach()))
    try:
        with torch.no_grad(), graft.iteration_budget(0):
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["c"]


def contraction(graft, c: torch.Tensor, steps: int = 20, seed: int = 0) -> dict[str, list[float]]:
    """Per sequence: rho (spectral norm of dg/dy at y = c) and the first-guess residual."""
    mask = attention_mask(c.shape[0], c.shape[1], 0, None, c.device)

    def g(y):
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no forward-mode derivative
            return graft.head(y, c, mask)

    with torch.no_grad():
        gc = g(c)
        per_position = (gc - c).norm(dim=-1) / c.norm(dim=-1)
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(c.shape, generator=generator)
    sigma = torch.zeros(c.shape[0])
    for _ in range(steps):
        v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1)  # J = 0 (fresh head): v -> 0
        _, jv = torch.func.jvp(g, (c,), (v,))
        _, vjp = torch.func.vjp(g, c)
        (jtjv,) = vjp(jv)
        sigma = jv.flatten(1).norm(dim=1)  # ||J v|| with ||v|| = 1 -> the largest singular value
        v = jtjv.detach()
    return {"rho": sigma.tolist(), "first_guess_residual": per_position.amax(1).tolist()}


def open_head(graft, std: float, gate_fraction: float, seed: int) -> None:
    """Output projections ~ N(0, std^2); every gate at gate_fraction * gamma_max."""
    generator = torch.Generator().manual_seed(seed)
    raw = math.log(gate_fraction / (1 - gate_fraction)) if gate_fraction < 1 else 30.0  # sigmoid(30) = 1
    with torch.no_grad():
        for block in graft.head.blocks:
            block.gate_attn_raw.fill_(raw)
            block.gate_mlp_raw.fill_(raw)
            for proj in (block.o_proj, block.down_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * std)


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "max": max(values)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--gamma-max", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0])
    parser.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--adapter", nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tokenizer = load_model(args.model, dtype=torch.float32)
    ids = real_text_ids(tokenizer, args.batch, args.seq)
    rows = []
    for gamma_max in args.gamma_max:
        model = attach_adapter(base, AttractorConfig(gamma_max=gamma_max, gamma_init=min(0.1, gamma_max / 2)))
        graft = model.grafts["default"]
        c = last_hidden(model, graft, ids)
        fresh = contraction(graft, c, seed=args.seed)
        rows.append({"head": "fresh (exact init)", "gamma_max": gamma_max, "std": 0.0, "gates": "gamma_init",
                     **{k: summary(v) for k, v in fresh.items()}})
        for std in args.stds:
            for label, fraction in (("gamma_init", graft.config.gamma_init / gamma_max), ("gamma_max", 1.0)):
                open_head(graft, std, fraction, args.seed)
                measured = contraction(graft, c, seed=args.seed)
                rows.append({"head": "opened", "gamma_max": gamma_max, "std": std, "gates": label,
                             **{k: summary(v) for k, v in measured.items()}})
        model.detach()
    for path in args.adapter:
        model = attach_adapter(base, path)
        graft = next(g for g in model.grafts.values() if g.config.graft_type == "attractor")
        c = last_hidden(model, graft, ids)
        gates = torch.cat([torch.cat(b.gates()) for b in graft.head.blocks])
        measured = contraction(graft, c, seed=args.seed)
        rows.append({"head": f"trained: {path}", "gamma_max": graft.config.gamma_max, "std": None,
                     "gates": f"mean {gates.mean():.3f} max {gates.max():.3f}",
                     **{k: summary(v) for k, v in measured.items()}})
        model.detach()
    print(json.dumps({"args": vars(args), "text": str(TEXT), "rows": rows}, indent=1))
    print("\nhead                 gamma_max  out-proj std  gates        rho mean  rho max  first-guess residual max")
    for r in rows:
        std = "-" if r["std"] is None else f"{r['std']:.2f}"
        print(f"{r['head'][:20]:20} {r['gamma_max']:9.2f} {std:>13} {r['gates'][:12]:12} "
              f"{r['rho']['mean']:9.3f} {r['rho']['max']:8.3f} {r['first_guess_residual']['max']:25.4f}")


if __name__ == "__main__":
    main()
