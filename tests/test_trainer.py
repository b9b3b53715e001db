"""transformers.Trainer and TRL's SFTTrainer on a GraftModel (tiny Llama, byte tokenizer, a few steps each)."""

import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from graft_fixtures import FFNBiasConfig, FFNBiasGraft, build_byte_tokenizer, build_tiny_model
from safetensors.torch import load_file

from graftlm import GraftTrainer
from graftlm.adapters import LoRAConfig, attach_adapter, register_graft
from graftlm.adapters.io import CARD_NAME, CONFIG_NAME, STACK_NAME, WEIGHTS_NAME

ADAPTER_FILES = {CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, STACK_NAME}
TEXTS = [f"the cat sat on mat number {i}" + " and then some more" * (i % 3) for i in range(16)]


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def dataset(tokenizer):
    from datasets import Dataset

    return Dataset.from_dict({"text": TEXTS}).map(lambda rows: tokenizer(rows["text"]), batched=True,
                                                 remove_columns=["text"])


def stacked_model(tokenizer):
    model = attach_adapter(build_tiny_model("llama", vocab_size=len(tokenizer)), FFNBiasConfig())
    return attach_adapter(model, LoRAConfig(r=2), adapter_name="lora")


def arguments(output_dir, **overrides):
    from transformers import TrainingArguments

    values = {"output_dir": str(output_dir), "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2,
              "report_to": [], "use_cpu": True, "disable_tqdm": True, "save_strategy": "no", "seed": 0,
              "logging_steps": 1}
    values.update(overrides)
    return TrainingArguments(**values)


def collator(tokenizer):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(tokenizer, mlm=False)


def graft_weights(model):
    return {f"{name}.{k}": v.clone() for name, g in model.grafts.items() for k, v in g.adapter_state_dict().items()}


def base_weights(model):
    state = model.base_model.state_dict()
    return {k.replace(".base_layer", ""): v.clone() for k, v in state.items() if "lora_" not in k}


def files(folder):
    return {p.name for p in folder.iterdir() if p.is_file()}


def test_the_forward_shows_the_base_signature_so_trainer_keeps_the_columns(tokenizer, dataset, tmp_path):
    """The issue's case: plain transformers.Trainer stopped with "No columns in the dataset match"."""
    from transformers import Trainer

    model = stacked_model(tokenizer)
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(model.forward).parameters)
    base_before, grafts_before = base_weights(model), graft_weights(model)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset, data_collator=collator(tokenizer))
    trainer.train()
    assert all(torch.equal(v, base_weights(model)[k]) for k, v in base_before.items())
    after = graft_weights(model)
    assert all(not torch.equal(v, after[k]) for k, v in grafts_before.items() if "lora_A" not in k)
    assert "eval_loss" in trainer.evaluate(dataset)  # the Trainer finds "labels" on GraftModel.forward
    # Why GraftTrainer exists: the plain Trainer saves what it knows how to save for an unknown model class,
    # the whole state dict, frozen base included.
    trainer.save_model(str(tmp_path / "plain"))
    saved = load_file(tmp_path / "plain" / "model.safetensors")
    assert any(k.startswith("base_model.") for k in saved) and not (tmp_path / "plain" / CONFIG_NAME).exists()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_graft_trainer_saves_the_adapter_and_not_the_base(tokenizer, dataset, tmp_path, checkpointing):
    model = stacked_model(tokenizer)
    base_before = base_weights(model)
    args = arguments(tmp_path / "run", save_strategy="steps", save_steps=2, gradient_checkpointing=checkpointing)
    trainer = GraftTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator(tokenizer))
    trainer.train()
    trainer.save_model()
    assert model.base_model.is_activation_checkpointing == checkpointing
    assert all(torch.equal(v, base_weights(model)[k]) for k, v in base_before.items())
    for folder in (tmp_path / "run", tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-3"):
        assert ADAPTER_FILES <= files(folder) and not {"model.safetensors", "pytorch_model.bin"} & files(folder)
        assert (folder / "lora" / WEIGHTS_NAME).exists()
    saved = load_file(tmp_path / "run" / WEIGHTS_NAME)
    assert set(saved) == set(model.grafts["default"].adapter_state_dict())
    card = (tmp_path / "run" / CARD_NAME).read_text()
    assert "| trainer | GraftTrainer |" in card and "| steps | 3 |" in card
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    reloaded = attach_adapter(build_tiny_model("llama", vocab_size=len(tokenizer)), tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    trainer_weights = graft_weights(model)
    if checkpointing:  # the same run without checkpointing ends with the same weights
        plain = stacked_model(tokenizer)
        GraftTrainer(model=plain, args=arguments(tmp_path / "plain"), train_dataset=dataset,
                     data_collator=collator(tokenizer)).train()
        for key, value in graft_weights(plain).items():
            torch.testing.assert_close(trainer_weights[key], value, rtol=1e-4, atol=1e-6)


def test_the_best_checkpoint_is_an_adapter_and_loads_back(tokenizer, dataset, tmp_path):
    model = stacked_model(tokenizer)
    args = arguments(tmp_path / "run", max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                     save_steps=2, load_best_model_at_end=True)
    trainer = GraftTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                           data_collator=collator(tokenizer))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert trainer.state.best_metric == min(e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e)
    with torch.no_grad():
        for p in model.graft_parameters():
            p.add_(1.0)
    trainer._load_best_model()
    saved = load_file(best / "lora" / WEIGHTS_NAME)
    assert all(torch.equal(saved[k], v) for k, v in model.grafts["lora"].adapter_state_dict().items())


def test_resuming_from_an_adapter_checkpoint_matches_the_uninterrupted_run(tokenizer, dataset, tmp_path):
    whole = stacked_model(tokenizer)
    GraftTrainer(model=whole, args=arguments(tmp_path / "whole", max_steps=4), train_dataset=dataset,
                 data_collator=collator(tokenizer)).train()
    first = stacked_model(tokenizer)
    args = arguments(tmp_path / "parts", max_steps=4, save_strategy="steps", save_steps=2)
    GraftTrainer(model=first, args=args, train_dataset=dataset, data_collator=collator(tokenizer)).train()
    resumed = stacked_model(tokenizer)
    GraftTrainer(model=resumed, args=args, train_dataset=dataset, data_collator=collator(tokenizer)).train(
        resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-2"))
    expected = graft_weights(whole)
    for key, value in graft_weights(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7)


# -- a graft's own objective and schedule -------------------------------------------------------------------
@dataclass
class OwnLossConfig(FFNBiasConfig):
    """Test graft: the FFN bias, whose training_loss hook returns the plain LM loss itself."""

    graft_type = "test_own_loss"


class OwnLossGraft(FFNBiasGraft):
    def __init__(self, config, base_model, patch):
        super().__init__(config, base_model, patch)
        self.calls, self.steps = 0, []

    def training_loss(self, model, batch):
        self.calls += 1
        return {"loss": model(**batch).loss}

    def on_train_step(self, step, total_steps):
        self.steps.append((step, total_steps))


register_graft(OwnLossConfig, OwnLossGraft)


def test_a_grafts_own_loss_and_schedule_are_used_and_weighted_like_the_trainers(tokenizer, dataset, tmp_path):
    """A hook returning the LM loss must train exactly like the Trainer's own loss, with gradient
    accumulation over batches holding different numbers of tokens."""
    args = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "optim": "sgd",
            "learning_rate": 0.5}
    own = attach_adapter(build_tiny_model("llama", vocab_size=len(tokenizer)), OwnLossConfig())
    GraftTrainer(model=own, args=arguments(tmp_path / "own", **args), train_dataset=dataset,
                 data_collator=collator(tokenizer)).train()
    graft = own.grafts["default"]
    assert graft.calls == 6 and sorted(set(graft.steps)) == [(1, 2), (2, 2)]
    plain = attach_adapter(build_tiny_model("llama", vocab_size=len(tokenizer)), FFNBiasConfig())
    GraftTrainer(model=plain, args=arguments(tmp_path / "plain", **args), train_dataset=dataset,
                 data_collator=collator(tokenizer)).train()
    expected = plain.grafts["default"].adapter_state_dict()
    assert any(v.abs().sum() > 0 for v in expected.values())
    for key, value in graft.adapter_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-7)


# -- TRL ------------------------------------------------------------------------------------------------------
def test_sft_trainer_trains_the_grafts_through_its_fused_head(tokenizer, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig

    from graftlm import GraftSFTTrainer

    model = stacked_model(tokenizer)
    with torch.no_grad():
        for p in model.grafts["default"].parameters():
            p.add_(0.1)
    batch = {"input_ids": torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])}
    batch["labels"] = batch["input_ids"]
    with torch.no_grad():
        plain_loss = model(**batch).loss
    base_before, grafts_before = base_weights(model), graft_weights(model)
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     max_length=32, report_to=[], use_cpu=True, disable_tqdm=True, bf16=False, save_strategy="steps",
                     save_steps=2, logging_steps=1, seed=0)
    trainer = GraftSFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                              processing_class=tokenizer)
    assert args.gradient_checkpointing  # TRL's default
    with torch.no_grad():  # TRL's fused head runs the grafts: the same loss as the model's own forward
        torch.testing.assert_close(model(**batch, fused_lm_head=True).loss, plain_loss)
    trainer.train()
    trainer.save_model()
    assert all(torch.equal(v, base_weights(model)[k]) for k, v in base_before.items())
    after = graft_weights(model)
    assert all(not torch.equal(v, after[k]) for k, v in grafts_before.items() if "lora_A" not in k)
    for folder in (tmp_path / "sft", tmp_path / "sft" / "checkpoint-2"):
        assert ADAPTER_FILES <= files(folder) and "model.safetensors" not in files(folder)
    assert "| trainer | GraftSFTTrainer |" in (tmp_path / "sft" / CARD_NAME).read_text()
    reloaded = attach_adapter(build_tiny_model("llama", vocab_size=len(tokenizer)), tmp_path / "sft")
    ids = batch["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_label_tokens_are_counted_on_the_device_from_shift_labels_when_given():
    from graftlm.trainer import label_token_count

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert label_token_count({"labels": labels}).item() == 4  # shifted by one: 5, 6 / 7, 8
    shifted = torch.tensor([[5, -100, -100], [7, 8, 9]])
    count = label_token_count({"labels": labels, "shift_labels": shifted})
    assert isinstance(count, torch.Tensor) and count.item() == 4


def test_fsdp_is_refused_with_the_way_out():
    from types import SimpleNamespace

    from graftlm.trainer import check_no_fsdp

    check_no_fsdp(SimpleNamespace(is_fsdp_enabled=False))
    with pytest.raises(NotImplementedError, match="under FSDP is not supported.*recipes loop"):
        check_no_fsdp(SimpleNamespace(is_fsdp_enabled=True))
