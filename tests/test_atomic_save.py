"""Saving is atomic: a failed save leaves the adapter on disk unchanged, a save replaces the whole adapter
folder (no stale sub-adapters), nothing saved is dropped or replaced unasked, files get the usual modes."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from graft_fixtures import AttnBiasConfig, FFNBiasConfig, build_tiny_model

from graftlm.adapters import GraftConfigError, LoRAConfig, SSTConfig, attach_adapter, io
from graftlm.adapters.io import CARD_NAME, CONFIG_NAME, STACK_NAME, WEIGHTS_NAME

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(directory):
    """Every file under ``directory`` with its bytes (what 'unchanged' means)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def open_sst(model, gate=0.5):
    with torch.no_grad():
        model.grafts["default"].gate_unfolded.fill_(gate)
    return model


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".graftlm-" in p.name]


def test_numpy_layer_indices_save_and_reload(tmp_path):
    """The issue's case: np.int64 target_layers once broke the config write after the weights were replaced."""
    folder = tmp_path / "sst"
    open_sst(attach_adapter(build_tiny_model("llama"), SSTConfig())).save_pretrained(folder)
    model = open_sst(attach_adapter(build_tiny_model("llama"), SSTConfig(target_layers=list(np.arange(2)))), 0.3)
    assert model.grafts["default"].config.target_layers == [0, 1]
    assert all(type(i) is int for i in model.grafts["default"].config.target_layers)
    expected = logits(model)
    model.save_pretrained(folder)
    reloaded = attach_adapter(build_tiny_model("llama"), folder)
    assert reloaded.grafts["default"].config.target_layers == [0, 1]
    assert torch.equal(logits(reloaded), expected)


def test_a_save_that_fails_midway_leaves_the_old_adapter_unchanged(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    old = open_sst(attach_adapter(build_tiny_model("llama"), SSTConfig()))
    old.save_pretrained(folder)
    before, old_logits = snapshot(folder), logits(old)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io, "save_file", disk_full)
    new = open_sst(attach_adapter(build_tiny_model("llama"), SSTConfig(blend_init=0.05)), 0.9)
    with pytest.raises(OSError, match="No space left"):
        new.save_pretrained(folder)
    assert snapshot(folder) == before and leftovers(tmp_path) == []
    monkeypatch.undo()
    assert torch.equal(logits(attach_adapter(build_tiny_model("llama"), folder)), old_logits)


def test_a_save_whose_read_back_differs_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "adapter"
    attach_adapter(build_tiny_model("llama"), FFNBiasConfig()).save_pretrained(folder)
    before = snapshot(folder)
    real_save = io.save_file

    def corrupting_save(tensors, path, metadata=None):
        real_save({k: v + 1 for k, v in tensors.items()}, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", corrupting_save)
    with pytest.raises(OSError, match="does not read back as written; nothing was saved"):
        attach_adapter(build_tiny_model("llama"), FFNBiasConfig(scale=2.0)).save_pretrained(folder)
    assert snapshot(folder) == before and leftovers(tmp_path) == []


def test_a_config_changed_to_a_bad_value_is_refused_before_writing(tmp_path):
    folder = tmp_path / "adapter"
    model = attach_adapter(build_tiny_model("llama"), SSTConfig())
    model.save_pretrained(folder)
    before = snapshot(folder)
    model.grafts["default"].config.max_deliberation = 0
    with pytest.raises(GraftConfigError, match=r"SSTConfig.max_deliberation: must be an integer >= 1, got 0"):
        model.save_pretrained(folder)
    assert snapshot(folder) == before


def test_stacked_save_over_a_sub_adapter_of_another_type_changes_nothing(tmp_path):
    folder = tmp_path / "stack"
    first = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
    attach_adapter(first, AttnBiasConfig(), adapter_name="extra").save_pretrained(folder)
    before = snapshot(folder)
    second = attach_adapter(build_tiny_model("llama"), FFNBiasConfig(scale=3.0))
    attach_adapter(second, LoRAConfig(r=2), adapter_name="extra")
    with pytest.raises(FileExistsError, match=r"stack/extra already holds a 'test_attn_bias' adapter.*'lora'"):
        second.save_pretrained(folder)
    assert snapshot(folder) == before


def test_a_save_replaces_the_whole_folder_no_stale_sub_adapter(tmp_path):
    folder = tmp_path / "stack"
    stacked = attach_adapter(build_tiny_model("llama"), SSTConfig())
    attach_adapter(stacked, LoRAConfig(r=2), adapter_name="extra").save_pretrained(folder)
    single = attach_adapter(build_tiny_model("llama"), SSTConfig())
    with pytest.raises(FileExistsError, match=r"saved adapters this save does not include: extra; refusing"):
        single.save_pretrained(folder)
    assert (folder / "extra" / CONFIG_NAME).exists()
    single.save_pretrained(folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, STACK_NAME]
    assert list(attach_adapter(build_tiny_model("llama"), folder).grafts) == ["default"]


def test_files_that_are_not_adapter_files_are_kept(tmp_path):
    folder = tmp_path / "adapter"
    model = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
    model.save_pretrained(folder)
    (folder / "README.md").write_text("my notes\n")
    (folder / "logs").mkdir()
    (folder / "logs" / "run.txt").write_text("step 1\n")
    model.save_pretrained(folder)
    assert (folder / "README.md").read_text() == "my notes\n" and (folder / "logs" / "run.txt").exists()
    (folder / "extra").mkdir()  # a folder of the user's, not an adapter, where a sub-adapter would go
    attach_adapter(model, AttnBiasConfig(), adapter_name="extra")
    with pytest.raises(FileExistsError, match=r"adapter/extra exists and is not a graftlm adapter"):
        model.save_pretrained(folder)


def test_saved_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        folder = tmp_path / "fresh"
        stacked = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
        attach_adapter(stacked, AttnBiasConfig(), adapter_name="attn").save_pretrained(folder)
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    assert modes == {"fresh": 0o755, "fresh/attn": 0o755, f"fresh/{CONFIG_NAME}": 0o644,
                     f"fresh/{WEIGHTS_NAME}": 0o644, f"fresh/attn/{CONFIG_NAME}": 0o644,
                     f"fresh/attn/{WEIGHTS_NAME}": 0o644, f"fresh/{CARD_NAME}": 0o644, f"fresh/{STACK_NAME}": 0o644}
    os.chmod(folder, 0o750)  # an existing folder keeps its own mode
    stacked.save_pretrained(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750


def test_a_save_without_a_default_adapter_loads_back(tmp_path):
    model = attach_adapter(build_tiny_model("gemma3"), FFNBiasConfig(), adapter_name="bias")
    with torch.no_grad():
        next(iter(model.graft_parameters())).fill_(0.25)
    expected = logits(model)
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CARD_NAME, "bias", STACK_NAME]
    reloaded = attach_adapter(build_tiny_model("gemma3"), tmp_path / "a")
    assert list(reloaded.grafts) == ["bias"] and torch.equal(logits(reloaded), expected)


def test_saving_over_a_file_or_an_unreadable_config_is_refused(tmp_path):
    model = attach_adapter(build_tiny_model("llama"), FFNBiasConfig())
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        model.save_pretrained(tmp_path / "file")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CONFIG_NAME).write_text("{not json")
    with pytest.raises(FileExistsError, match=r"broken/adapter_config.json exists but is not a readable adapter"):
        model.save_pretrained(tmp_path / "broken")
    model.save_pretrained(tmp_path / "broken", overwrite=True)
    assert json.loads((tmp_path / "broken" / CONFIG_NAME).read_text())["graft_type"] == "test_ffn_bias"
