"""Run by `accelerate launch` in test_recipe_ddp.py: trains a tiny LoRA and writes this rank's weight digests."""

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from accelerate import PartialState
from graft_fixtures import build_tiny_model
from recipe_toys import CharTokenizer, toy_examples, toy_recipe

from graftlm.adapters import trainable_state_dict
from graftlm.recipes.batches import BatchPlan
from graftlm.recipes.loop import train


def main(out: Path) -> None:
    recipe = toy_recipe(out, graft={"type": "lora", "r": 2, "dropout": 0.1}, train__steps=3, train__grad_accum=2,
                        train__batch_size=2, train__lr=0.05)
    examples = toy_examples(16, ragged=True)
    result = train(recipe, build_tiny_model("llama"), CharTokenizer(), examples, toy_examples(4))
    state = PartialState()
    weights = trainable_state_dict(result.model)
    plan = BatchPlan(len(examples), 2, state.num_processes, state.process_index, recipe.train.seed)
    record = {
        "rank": state.process_index,
        "num_processes": state.num_processes,
        "first_micro_batch": plan.indices(0),
        "digests": {k: hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                    for k, v in sorted(weights.items())},
        "lora_B_abs_sum": sum(float(v.abs().sum()) for k, v in weights.items() if "lora_B" in k),
        "summary": result.summary,
    }
    (out / f"rank{state.process_index}.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
