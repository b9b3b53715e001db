"""Hub citizenship: the model card save_pretrained / push_to_hub write, a user's README.md left alone, and a
saved adapter loaded by Hub id from a local Hugging Face cache with the Hub offline."""

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from graft_fixtures import AttnBiasConfig, FFNBiasConfig, build_tiny_model

from graftlm.adapters import SSTConfig, attach_adapter
from graftlm.adapters.io import CARD_NAME, CONFIG_NAME, STACK_NAME, WEIGHTS_NAME, ModelCardWarning
from graftlm.adapters.model_card import CARD_MARKER

IDS = torch.tensor([[3, 17, 42, 9, 77, 5, 120]])
REPO = Path(__file__).resolve().parents[1]


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def sst_model(name_or_path="tiny-llama"):
    base = build_tiny_model("llama")
    base.config._name_or_path = name_or_path
    model = attach_adapter(base, SSTConfig(target_layers=[0, 1]))
    with torch.no_grad():
        sst = model.grafts["default"]
        sst.set_blend(sst.config.blend_init, gate=0.5)
    return model


# -- the card ---------------------------------------------------------------------------------------------
def test_the_card_has_the_hub_metadata_the_graft_its_config_and_how_to_load_it(tmp_path):
    sst_model("smollm2-135m").save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / CARD_NAME).read_text()
    assert front_matter(card) == {"library_name": "graftlm", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                  "tags": ["graftlm", "graftlm-sst"]}
    assert CARD_MARKER in card
    assert "SST sticky-note memory: a per-layer state blended into the FFN input (METHODS.md section 1)." in card
    for field, help_text in SSTConfig.field_help().items():  # every field with its value and help text
        assert f"| `{field}` |" in card and help_text.split(".")[0] in card
    assert "| `target_layers` | `[0, 1]` |" in card
    assert "graftlm's embedded checkpoint `smollm2-135m`" in card
    assert 'model, tokenizer = graftlm.load_model("smollm2-135m")' in card
    assert 'model = graftlm.attach_adapter(model, "path/to/adapter")' in card and str(tmp_path) not in card
    assert "No training summary was saved with this adapter." in card


def test_a_stack_card_tags_every_graft_type_in_order_and_shows_the_training_figures(tmp_path):
    base = build_tiny_model("gemma3")
    base.config._name_or_path = "someone/tiny-gemma"
    model = attach_adapter(attach_adapter(base, AttnBiasConfig(), adapter_name="attn"), FFNBiasConfig())
    summary = {"steps": 60, "final_loss": 1.234567, "final_eval_loss": None, "device": "cpu",
               "adapter_dir": "/home/me/run/adapter"}
    model.save_pretrained(tmp_path, training_summary=summary)
    card = (tmp_path / CARD_NAME).read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "someone/tiny-gemma"
    assert meta["tags"] == ["graftlm", "graftlm-test-attn-bias", "graftlm-test-ffn-bias"]
    assert card.index("| `attn` | `test_attn_bias` |") < card.index("| `default` | `test_ffn_bias` |")
    assert "| steps | 60 |" in card and "| final_loss | 1.235 |" in card and "| device | cpu |" in card
    assert "final_eval_loss" not in card and "/home/me" not in card  # no empty figures, no local paths
    before = (tmp_path / CARD_NAME).read_bytes()
    model.save_pretrained(tmp_path, training_summary=summary)
    assert (tmp_path / CARD_NAME).read_bytes() == before  # nothing in it changes between two saves


def test_a_local_base_gets_no_base_model_entry(tmp_path):
    sst_model(str(tmp_path)).save_pretrained(tmp_path / "a")  # an existing local path, not a Hub id
    card = (tmp_path / "a" / CARD_NAME).read_text()
    assert "base_model" not in front_matter(card) and "(a local model, not on the Hub)" in card


def test_a_readme_of_the_users_is_kept_and_a_graftlm_card_is_rewritten(tmp_path):
    model = sst_model()
    model.save_pretrained(tmp_path)
    card = (tmp_path / CARD_NAME).read_text()
    model.save_pretrained(tmp_path, training_summary={"steps": 5})  # a graftlm card: rewritten
    assert "| steps | 5 |" in (tmp_path / CARD_NAME).read_text()
    edited = card.replace(CARD_MARKER + "\n", "") + "\nMy own notes.\n"  # the marker deleted: the user's now
    (tmp_path / CARD_NAME).write_text(edited)
    with pytest.warns(ModelCardWarning, match="is not a graftlm model card; kept it"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / CARD_NAME).read_text() == edited
    (tmp_path / CARD_NAME).unlink()
    model.save_pretrained(tmp_path)
    assert CARD_MARKER in (tmp_path / CARD_NAME).read_text()


# -- push_to_hub ---------------------------------------------------------------------------------------------
class FakeHub:
    """What push_to_hub calls on huggingface_hub.HfApi, recorded; ``readme`` is the repo's README.md, if any."""

    def __init__(self, readme=None):
        self.readme = readme
        self.calls = {}

    def api(self, token=None):
        hub = self
        hub.calls["token"] = token

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
                hub.calls["create"] = (repo_id, private, exist_ok, repo_type)

            def file_exists(self, repo_id, filename, revision=None):
                return filename == CARD_NAME and hub.readme is not None

            def hf_hub_download(self, repo_id, filename, revision=None):
                path = Path(hub.calls["tmp"]) / "remote-README.md"
                path.write_text(hub.readme)
                return str(path)

            def upload_folder(self, repo_id, folder_path, commit_message, revision=None, ignore_patterns=None):
                ignored = set(ignore_patterns or [])
                hub.calls["files"] = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*")
                                            if p.is_file() and p.name not in ignored)
                hub.calls["card"] = (Path(folder_path) / CARD_NAME).read_text()
                return f"https://hub/{repo_id}/commit/1"

        return Api()


@pytest.mark.parametrize("remote_readme", [None, "graftlm", "users"])
def test_push_to_hub_uploads_the_adapter_and_its_card_and_keeps_a_users_readme(monkeypatch, tmp_path, remote_readme):
    import huggingface_hub

    readme = {None: None, "graftlm": f"---\nlibrary_name: graftlm\n---\n{CARD_MARKER}\nold card\n",
              "users": "# My adapter\nhand-written\n"}[remote_readme]
    hub = FakeHub(readme)
    hub.calls["tmp"] = tmp_path
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api)
    model = attach_adapter(attach_adapter(build_tiny_model("llama"), FFNBiasConfig()), AttnBiasConfig(),
                           adapter_name="attn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        url = model.push_to_hub("me/adapter", private=True, token="t", training_summary={"steps": 7})
    assert url.endswith("/commit/1") and hub.calls["token"] == "t"
    assert hub.calls["create"] == ("me/adapter", True, True, "model")
    adapter_files = [CONFIG_NAME, WEIGHTS_NAME, f"attn/{CONFIG_NAME}", f"attn/{WEIGHTS_NAME}", STACK_NAME]
    kept = remote_readme == "users"
    assert hub.calls["files"] == sorted(adapter_files + ([] if kept else [CARD_NAME]))
    assert [issubclass(w.category, ModelCardWarning) for w in caught].count(True) == int(kept)
    assert 'graftlm.attach_adapter(model, "me/adapter")' in hub.calls["card"]
    assert "| steps | 7 |" in hub.calls["card"]


# -- loading by Hub id from the cache, offline ------------------------------------------------------------------
def populate_hub_cache(cache: Path, repo_id: str, folder: Path, revision: str = "a" * 40) -> Path:
    """Lay ``folder`` out as huggingface_hub caches a model repo snapshot: content-addressed blobs,
    ``snapshots/<revision>/`` of relative symlinks to them, ``refs/main`` naming the revision."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


LOAD_BY_HUB_ID = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from graft_fixtures import build_tiny_model
import graftlm
out = {}
for family in ("llama", "gemma3"):
    model = graftlm.attach_adapter(build_tiny_model(family), f"someone/{family}-stack")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 17, 42, 9, 77, 5, 120]])).logits
    out[family] = {"grafts": list(model.grafts), "logits": logits.flatten().tolist()}
try:
    graftlm.attach_adapter(build_tiny_model("llama"), "someone/not-in-the-cache")
except FileNotFoundError as err:
    out["missing"] = str(err)
print(json.dumps(out))
"""


def test_a_saved_stack_loads_by_hub_id_from_the_cache_with_the_hub_offline(tmp_path):
    expected = {}
    for family in ("llama", "gemma3"):
        model = attach_adapter(build_tiny_model(family), AttnBiasConfig(), adapter_name="attn")
        model = attach_adapter(model, FFNBiasConfig())
        with torch.no_grad():
            for p in model.graft_parameters():
                p.add_(torch.randn(p.shape) * 0.3)
        expected[family] = logits(model).flatten()
        model.save_pretrained(tmp_path / family)
        populate_hub_cache(tmp_path / "hub", f"someone/{family}-stack", tmp_path / family)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads()),  # bit-exact logits need the same matmul split
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", LOAD_BY_HUB_ID, str(REPO / "tests")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    for family in ("llama", "gemma3"):
        assert loaded[family]["grafts"] == ["attn", "default"]
        assert torch.equal(torch.tensor(loaded[family]["logits"]), expected[family])
    assert "could not be fetched from the Hugging Face Hub" in loaded["missing"]
