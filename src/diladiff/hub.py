"""Exported models: a trained stage leaves its run folder as a self-describing folder

    OUT/config.json        {"stage": kind, "settings": the resolved config, "tokenizer_identity"}
    OUT/model.safetensors  the weights (EMA by default), keys "stage.<name>"
    OUT/tokenizer*.json    the tokenizer's files (a corpus BPE's with diladiff_tokenizer.json, its
                       training record)
    OUT/README.md          a model card: method, training data, steps, last evaluation

written and read by huggingface_hub's PyTorchModelHubMixin, so `ExportedModel.from_pretrained`
loads it from a folder or a hub repository and `push_to_hub` publishes it where there is a
network. Frozen feature models (the auto-encoder's BERT) are referenced by name in the config,
not copied: the loader fetches them as training did.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from diladiff.config import Config
from diladiff.data.bpe import PROVENANCE, bpe_spec
from diladiff.data.tokenizer import check_same_tokenizer, load_tokenizer, tokenizer_identity
from diladiff.errors import CheckpointError
from diladiff.runs import load_run
from diladiff.stages import STAGES
from diladiff.train import checkpoint as ckpt
from diladiff.version import __version__

TAGS = ["diffusion-language-model", "masked-diffusion", "diladiff"]


class ExportedModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="diladiff",
    tags=TAGS,
    repo_url="https://github.com/diladiff/diladiff",
):
    """A stage rebuilt from its exported config (the mixin stores these init arguments as
    config.json and the weights as model.safetensors)."""

    # Not `config`: the mixin would write that argument alone as config.json.
    def __init__(self, stage: str, settings: dict, tokenizer_identity: dict, diladiff: str = ""):
        super().__init__()
        if stage not in STAGES:
            raise CheckpointError(
                f"exported stage {stage!r} is not registered here (diladiff {__version__}; "
                f"exported with {diladiff or 'unknown'}); is its plug-in imported?"
            )
        self.kind = stage
        self.stage = STAGES[stage](Config.from_dict(settings), tokenizer_identity)


def is_export(path: Path) -> bool:
    """A folder written by `export_run` (or downloaded from the hub)."""
    try:
        return "tokenizer_identity" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "ema") -> Path:
    """Write the newest checkpoint of a run folder (`which` weights) as an exported folder."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    stage, tok = load_run(run_dir, which=which)
    info = ckpt.read_run_info(run_dir)
    model = ExportedModel(info["stage"], stage.cfg.to_dict(), stage.tokenizer_identity, __version__)
    model.stage.load_state_dict(stage.state_dict())
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    record = Path(tok.name_or_path) / PROVENANCE  # how a corpus BPE was trained
    if record.is_file():
        shutil.copy2(record, out_dir / PROVENANCE)
    (out_dir / "README.md").write_text(model_card(run_dir, info, stage.cfg, which))
    return out_dir


def load_exported(name_or_path: str | Path, device: torch.device | str = "cpu"):
    """(stage in eval mode on `device`, tokenizer) of an exported folder or hub repository."""
    folder = Path(name_or_path)
    if not folder.is_dir():  # a hub id: the whole repository (weights and tokenizer files)
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(str(name_or_path)))
        except Exception as exc:  # offline, unknown repository, no access: one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(
                f"{name_or_path} is not a diladiff run folder (no run.json) or an exported model "
                f"here, and not a hub repository that could be fetched ({first})"
            ) from None
    if not is_export(folder):
        raise CheckpointError(f"{folder} is neither a diladiff run folder nor an exported model")
    model = ExportedModel.from_pretrained(folder, map_location=str(device), strict=True)
    tok = load_tokenizer(str(folder))
    identity = model.stage.tokenizer_identity
    check_same_tokenizer(identity, tokenizer_identity(tok), f"loading {folder}")
    model.stage.use_tokenizer(tok)  # the exported copy: no corpus or BPE cache needed
    return model.stage.to(device).eval(), tok


def load_any(name_or_path: str | Path, which: str = "ema", device: torch.device | str = "cpu"):
    """(stage, tokenizer) from a run folder (its `which` weights), an exported folder or a hub
    repository id."""
    path = Path(name_or_path)
    if (path / "run.json").is_file() or (path.is_dir() and not is_export(path)):
        return load_run(path, which=which, device=device)  # a run (or its clear error)
    return load_exported(name_or_path, device)


def tokenizer_note(name: str) -> str:
    """The model card's words on the tokenizer."""
    if bpe_spec(name) is None:
        return "files included"
    return "byte-level BPE trained on the training split of the data; files included"


def model_card(run_dir: Path, info: dict, cfg: Config, which: str) -> str:
    """A Markdown model card from the run folder's records (nothing measured here)."""
    log = run_dir / "log.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
    evals = [r for r in records if r.get("event") == "eval"]
    step = max((r["step"] for r in records if "step" in r), default=0)
    data = info.get("data", {})
    lines = [
        "---",
        "library_name: diladiff",
        "tags:",
        *(f"- {t}" for t in TAGS),
        "---",
        "",
        f"# diladiff `{info['stage']}` model",
        "",
        f"Exported by diladiff {__version__} from `{run_dir.name}` ({which} weights, step "
        f"{step}). Load it with `diladiff.load(PATH_OR_HUB_ID)` or "
        "`diladiff sample PATH_OR_HUB_ID`.",
        "",
        "| | |",
        "|---|---|",
        f"| stage | {info['stage']} (preset `{cfg.preset}`) |",
        f"| training data | `{data.get('source', cfg.data.source)}`, "
        f"{data.get('train_rows', '?')} rows of {cfg.data.seq_len} tokens |",
        f"| tokenizer | `{cfg.data.tokenizer}` ({tokenizer_note(cfg.data.tokenizer)}) |",
        f"| network | {cfg.model.depth} x {cfg.model.width} |",
    ]
    if "autoencoder" in cfg.section_names():
        lines.append(
            f"| frozen feature model | `{cfg.autoencoder.feature_model}` (not included: "
            "fetched by name) |"
        )
    for role, parent in info.get("parents", {}).items():
        lines.append(f"| {role} | `{Path(parent).name}` |")
    if evals:
        last = evals[-1]
        figures = ", ".join(f"{k} = {v:.4g}" for k, v in last.items() if k not in ("step", "event"))
        lines += ["", f"Last validation (step {last['step']}, held-out split): {figures}."]
    lines += [
        "",
        "Samples and their evaluation (GenPPL, entropy, MAUVE) are not part of the export: "
        "run `diladiff sample` and `diladiff eval` under the project's protocol.",
        "",
    ]
    return "\n".join(lines)
