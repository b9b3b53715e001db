"""Attractor refinement, graft level (issue 5 part 7; METHODS.md section 2): the `AttractorConfig` graft
on a frozen causal LM.

    python3 benchmarks/attractor.py [--model tiny | smollm2-135m | gemma-3-270m] [--batch 2] [--seq 63]
                                    [--scale 0.05] [--gate 0.5] [--new-tokens 8] [--threads 1]

The head is opened as a trained one would be: gates at ``--gate`` x gamma_max and the zero-initialised
output projections drawn with std ``--scale`` (a fresh adapter is the identity and needs no solve).
Random token ids; ``tiny`` is a random 4-layer Llama (hidden 128) built here, no download.

  1. Inference: relative residual at the first guess ||g(c) - c|| / ||c||, and iterations to tol
     (1.5e-4) for plain iteration vs Anderson (m = 5), with the forward's wall time.
  2. Training step (forward + LM loss + backward) with exactly n = 1, 8, 32 head iterations (tol 0):
     implicit gradients (Anderson adjoint) vs backprop through n unrolled plain iterations of the same
     head. "saved MiB" = distinct storages autograd packs for backward during the forward (the backbone's
     share is the same in both); step time = best of ``--repeats``.
  3. Decode: per-token head iterations of greedy ``generate`` (the head's own KV cache).
Prints JSON, then tables. Peak-memory figures of the bare solver are in benchmarks/attractor_solvers.py.
"""

import argparse
import json
import time

import torch

from graftlm import AttractorConfig, attach_adapter
from graftlm.adapters.attractor import AttractorGraft, attention_mask
from graftlm.kernels.fixed_point import unrolled_picard
from graftlm.kernels.fixed_point.memory import autograd_saved_bytes
from graftlm.patches.cache_kwarg import cache_from_output

TRAIN_ITERS = (1, 8, 32)


def build_model(name: str):
    if name != "tiny":
        from graftlm import load_model

        return load_model(name, dtype=torch.float32)[0].eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def open_head(graft: AttractorGraft, scale: float, gate: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in graft.head.blocks:
            raw = torch.logit(torch.tensor(gate))
            block.gate_attn_raw.fill_(raw)
            block.gate_mlp_raw.fill_(raw)
            for proj in (block.o_proj, block.down_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * scale)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def inference(model, graft, ids, repeats):
    out = {}
    with torch.no_grad(), graft.iteration_budget(0):
        model(input_ids=ids)
        out["first_guess_residual"] = graft.last_solve_info["residual"].mean().item()
    for solver in ("picard", "anderson"):
        graft.config.solver = solver
        with torch.no_grad():
            seconds = best_time(lambda: model(input_ids=ids), repeats)
        info = graft.last_solve_info
        out[solver] = {
            "iterations": info["iterations"].float().mean().item(),
            "converged": info["converged"].float().mean().item(),
            "residual": info["residual"].max().item(),
            "forward_ms": seconds * 1e3,
        }
    graft.config.solver = "anderson"
    return out


def training(model, graft, ids, repeats):
    rows = []
    model.train()
    saved = (graft.config.tol, graft.config.min_iter, graft.config.max_iter)
    for n in TRAIN_ITERS:
        graft.config.tol, graft.config.min_iter, graft.config.max_iter = 0.0, n, n
        for mode in ("implicit", "unrolled"):
            if mode == "unrolled":

                def unrolled(c, n=n):
                    mask = attention_mask(c.shape[0], c.shape[1], 0, None, c.device)
                    return unrolled_picard(lambda y: graft.head(y, c, mask), c, n)

                graft.refine = unrolled

            def forward():
                return model(input_ids=ids, labels=ids).loss

            def step():
                model.zero_grad(set_to_none=True)
                forward().backward()

            try:
                mib = autograd_saved_bytes(forward) / 2**20
                seconds = best_time(step, repeats)
            finally:
                graft.__dict__.pop("refine", None)
            rows.append({"iterations": n, "mode": mode, "saved_mib": mib, "step_ms": seconds * 1e3})
    graft.config.tol, graft.config.min_iter, graft.config.max_iter = saved
    model.eval()
    return rows


def decode(model, ids, new_tokens):
    prompt = ids[:1]
    out = model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0, return_dict_in_generate=True,
    )  # fmt: skip
    per_call = AttractorGraft.cache_iterations(cache_from_output(out))
    per_token = [int(n[0]) for n in per_call[1:]]
    return {"prefill_iterations": int(per_call[0][0]), "per_token_iterations": per_token}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=63)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--gate", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1 is steadier than 2 on a shared machine")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base = build_model(args.model)
    model = attach_adapter(base, AttractorConfig())
    graft = model.grafts["default"]
    open_head(graft, args.scale, args.gate, args.seed)
    ids = torch.randint(3, base.config.vocab_size, (args.batch, args.seq))
    results = {
        "args": vars(args),
        "head_parameters": sum(p.numel() for p in graft.parameters()),
        "inference": inference(model, graft, ids, args.repeats),
        "training": training(model, graft, ids, args.repeats),
        "decode": decode(model, ids, args.new_tokens),
    }
    print(json.dumps(results, indent=1))
    inf = results["inference"]
    print(f"\nfirst-guess residual ||g(c) - c|| / ||c||: {inf['first_guess_residual']:.4f}")
    print("\nsolver    iterations  converged  max residual  forward ms")
    for solver in ("picard", "anderson"):
        r = inf[solver]
        cells = (
            f"{r['iterations']:10.1f} {r['converged']:10.2f} {r['residual']:13.2e} {r['forward_ms']:11.1f}"
        )
        print(f"{solver:9} {cells}")
    print("\niterations  mode      saved MiB  ratio to n=1  step ms")
    first = {row["mode"]: row["saved_mib"] for row in results["training"] if row["iterations"] == 1}
    for row in results["training"]:
        ratio = row["saved_mib"] / first[row["mode"]]
        cells = f"{row['saved_mib']:10.2f} {ratio:13.2f} {row['step_ms']:8.1f}"
        print(f"{row['iterations']:10} {row['mode']:9} {cells}")
    dec = results["decode"]
    print(
        f"\ndecode: prefill {dec['prefill_iterations']} head iterations, per token",
        dec["per_token_iterations"],
    )


if __name__ == "__main__":
    main()
