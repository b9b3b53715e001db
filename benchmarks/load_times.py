"""Cold (GGUF -> HF conversion) and cached load times of the embedded checkpoints. Prints JSON and a table.

    python3 benchmarks/load_times.py [--models smollm2-135m gemma-3-270m]

Cold loads use a fresh temporary ``GRAFTLM_CACHE`` so nothing is reused; the cached load reads the
directory the cold load wrote.
"""

import argparse
import json
import os
import tempfile
import time


def measure(name: str) -> dict:
    from graftlm import attach_adapter, load_model
    from graftlm.adapters import LoRAConfig

    with tempfile.TemporaryDirectory() as cache:
        os.environ["GRAFTLM_CACHE"] = cache
        started = time.perf_counter()
        load_model(name)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        model, _ = load_model(name)
        cached = time.perf_counter() - started
    graft = attach_adapter(model, LoRAConfig(r=8))
    trainable, total = graft.get_nb_trainable_parameters()
    return {"model": name, "cold_s": round(cold, 1), "cached_s": round(cached, 2),
            "base_params": total - trainable, "lora_r8_trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    args = parser.parse_args()
    rows = [measure(name) for name in args.models]
    print(json.dumps(rows, indent=2))
    print(f"\n{'model':14s} {'cold load':>10s} {'cached load':>12s} {'base params':>13s} {'LoRA r=8':>10s}")
    for r in rows:
        print(f"{r['model']:14s} {r['cold_s']:>9.1f}s {r['cached_s']:>11.2f}s {r['base_params']:>13,} "
              f"{r['lora_r8_trainable']:>10,}")


if __name__ == "__main__":
    main()
