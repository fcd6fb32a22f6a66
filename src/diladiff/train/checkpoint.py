"""Run folders and atomic checkpoints.

    RUN/config.json              resolved config
    RUN/run.json                 stage kind, tokenizer identity, parent runs
    RUN/log.jsonl                one JSON object per logged step / evaluation
    RUN/checkpoints/step_00001000/{model,ema}.safetensors + trainer.pt
    RUN/checkpoints/latest       name of the newest complete checkpoint

A checkpoint is written to a temporary folder and renamed into place, and `latest` is replaced
atomically, so a crash mid-write leaves the previous checkpoint intact and current.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diladiff.errors import CheckpointError

CKPT_DIR = "checkpoints"
FILES = ("model.safetensors", "ema.safetensors", "trainer.pt")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a diladiff run folder (no run.json)")
    return json.loads(path.read_text())


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict, ema_state: dict, trainer_state: dict, keep: int = 2
) -> Path:
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"step": str(step), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    save_file(_contiguous(model_state), tmp / "model.safetensors", metadata=meta)
    save_file(_contiguous(ema_state), tmp / "ema.safetensors", metadata=meta)
    torch.save(trainer_state, tmp / "trainer.pt")
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(name + "\n")
    os.replace(pointer, root / "latest")
    for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders holding every file, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if re.fullmatch(r"step_\d{8}", p.name) and all((p / f).is_file() for f in FILES)
    ]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if all((path / f).is_file() for f in FILES):
            return path
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_weights(run_dir: Path, which: str = "ema") -> tuple[dict[str, torch.Tensor], int]:
    """The newest checkpoint's weights ('ema' or 'model') and its step. The EMA file holds the
    trained parameters and buffers only (train/ema.py): the frozen ones come from the model's."""
    from diladiff.train.ema import ema_weights

    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint")
    weights = read_safetensors(path / "model.safetensors")
    if which == "ema":
        weights = ema_weights(weights, read_safetensors(path / "ema.safetensors"))
    return weights, int(path.name.split("_")[1])


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors; CheckpointError when it is missing or damaged."""
    from safetensors import SafetensorError

    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint file {path} is damaged ({exc})") from None


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
