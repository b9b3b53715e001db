"""The model card (``README.md``) that `GraftModel.save_pretrained` and `GraftModel.push_to_hub` write.

A card is Hugging Face Hub metadata (YAML: ``library_name: graftlm``, ``base_model``, tags with the graft
types) and a page: what each graft is (its config class's docstring), its config (every field with its
help text), the base model, the training figures when a summary was given, and the lines that load it.
It is rendered from the adapters alone, with nothing that changes between two saves of the same adapter
(no dates), so re-saving the same adapter writes the same bytes.

The line `CARD_MARKER` marks a card graftlm wrote and may rewrite; a README.md without it is the user's
and is never replaced (`graftlm.adapters.io.write_adapters`). Deleting that line from a card keeps one's
own edits from then on.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

from graftlm.adapters.config import GraftConfig

CARD_MARKER = ("<!-- graftlm model card: save_pretrained / push_to_hub rewrite this file; delete this line "
               "to keep your own edits -->")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: Summary entries that are paths on the training machine: not shown on a card meant for sharing.
LOCAL_ONLY_SUMMARY_KEYS = ("adapter_dir", "resumed_from", "output_dir")


def is_graftlm_card(text: str) -> bool:
    """Whether ``text`` (a README.md) is a card graftlm wrote and may replace."""
    return CARD_MARKER in text


def graft_tag(graft_type: str) -> str:
    """The Hub tag of a graft type: ``graftlm-sst``, ``graftlm-range-search``."""
    return "graftlm-" + graft_type.replace("_", "-")


def describe_graft(config: GraftConfig) -> str:
    """What the graft is, in one line: the first paragraph of its config class's docstring."""
    doc = inspect.getdoc(type(config)) or type(config).__name__
    return " ".join(doc.split("\n\n")[0].split())


def hub_base_model(base: dict[str, Any]) -> str | None:
    """The Hub id to put under ``base_model``: the base's own id, or the upstream model of an embedded
    checkpoint; None for a local path or an unnamed base (the card then names it in its text only)."""
    from graftlm.models import EMBEDDED_CHECKPOINTS

    name = base.get("name_or_path")
    if not name:
        return None
    if name in EMBEDDED_CHECKPOINTS:
        return EMBEDDED_CHECKPOINTS[name].upstream
    if HUB_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None


def render_model_card(
    adapters: list[tuple[str, GraftConfig]],
    base: dict[str, Any],
    load_from: str,
    training_summary: dict[str, Any] | None = None,
) -> str:
    """The card for ``adapters`` ((adapter name, config) in attach order) saved for ``base`` (the
    ``base_model`` record of `io.base_model_record`); ``load_from`` is what `attach_adapter` is given to
    load it (a Hub repo id or a folder)."""
    graft_types = [config.graft_type for _, config in adapters]
    metadata = ["library_name: graftlm"]
    hub_base = hub_base_model(base)
    if hub_base is not None:
        metadata.append(f"base_model: {hub_base}")
    metadata.append("tags:")
    metadata += [f"- {tag}" for tag in ["graftlm", *dict.fromkeys(graft_tag(t) for t in graft_types)]]

    base_name = base.get("name_or_path") or "(unnamed base model)"
    lines = ["---", *metadata, "---", CARD_MARKER, "",
             f"# graftlm adapter: {' + '.join(graft_types)} on {base_name}", "",
             ("New mechanisms grafted onto a frozen pretrained causal LM with graftlm: only the grafts' tensors "
              "are saved here, the base model is loaded from its own files."), ""]
    lines += _grafts_section(adapters)
    lines += _base_section(base, hub_base)
    lines += _training_section(training_summary)
    lines += _loading_section(base, load_from)
    return "\n".join(lines).rstrip("\n") + "\n"


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _grafts_section(adapters: list[tuple[str, GraftConfig]]) -> list[str]:
    lines = ["## Grafts", ""]
    if len(adapters) > 1:
        lines += ["Stacked in this order (loading the folder attaches them in the same order):", ""]
    lines += ["| adapter | graft type | what it is |", "|---|---|---|"]
    lines += [f"| `{name}` | `{config.graft_type}` | {_cell(describe_graft(config))} |" for name, config in adapters]
    for name, config in adapters:
        helps = config.field_help()
        lines += ["", f"### `{name}` config ({type(config).__name__})", "", "| field | value | meaning |",
                  "|---|---|---|"]
        for key, value in config.to_dict().items():
            lines.append(f"| `{key}` | `{_cell(json.dumps(value))}` | {_cell(helps.get(key, ''))} |")
    return lines + [""]


def _base_section(base: dict[str, Any], hub_base: str | None) -> list[str]:
    from graftlm.models import EMBEDDED_CHECKPOINTS

    name = base.get("name_or_path")
    shape = (f"{base.get('architecture')} (model type `{base.get('model_type')}`), hidden size "
             f"{base.get('hidden_size')}, {base.get('num_hidden_layers')} layers")
    lines = ["## Base model", ""]
    if name in EMBEDDED_CHECKPOINTS:
        lines.append(f"graftlm's embedded checkpoint `{name}`: {EMBEDDED_CHECKPOINTS[name].description} "
                     f"(upstream: `{hub_base}`); {shape}.")
    elif hub_base is not None:
        lines.append(f"`{name}` on the Hugging Face Hub; {shape}.")
    else:
        lines.append(f"`{name}` (a local model, not on the Hub); {shape}.")
    if base.get("revision"):
        lines.append(f"Revision `{base['revision']}`.")
    lines += ["", "Loading checks the base's architecture, width and depth against these and refuses another.", ""]
    return lines


def _training_section(summary: dict[str, Any] | None) -> list[str]:
    lines = ["## Training", ""]
    shown = {key: value for key, value in (summary or {}).items()
             if key not in LOCAL_ONLY_SUMMARY_KEYS and value is not None
             and isinstance(value, (bool, int, float, str))}
    if not shown:
        return lines + ["No training summary was saved with this adapter.", ""]
    lines += ["| figure | value |", "|---|---|"]
    for key, value in shown.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {_cell(key)} | {_cell(text)} |")
    return lines + [""]


def _loading_section(base: dict[str, Any], load_from: str) -> list[str]:
    base_name = base.get("name_or_path") or "<the base model>"
    return ["## Load it", "", "```python", "import graftlm", "",
            f"model, tokenizer = graftlm.load_model({json.dumps(base_name)})",
            f"model = graftlm.attach_adapter(model, {json.dumps(load_from)})", "```", ""]
