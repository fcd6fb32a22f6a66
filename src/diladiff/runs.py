"""Run folders end to end: create or resume a training run, and load a trained stage.

train_run("mdlm", "runs/m", preset="tiny", overrides=["train.max_steps=20"])
stage, tok = load_run("runs/m")            # EMA weights, ready to sample
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diladiff import __version__
from diladiff.config import Config, ConfigError, apply_overrides, build_config, check_warmups
from diladiff.data.packing import prepare_data
from diladiff.data.tokenizer import check_same_tokenizer, load_tokenizer, tokenizer_identity
from diladiff.errors import CheckpointError
from diladiff.stages import STAGES, Stage
from diladiff.train import checkpoint as ckpt
from diladiff.train.distributed import barrier, setup, teardown
from diladiff.train.trainer import Trainer


def resolve_config(
    kind: str, run_dir: Path, preset: str | None, overrides: list[str], parents: dict | None = None
) -> tuple[Config, bool]:
    """The config of a new run (preset + sections inherited from the parent run + overrides)
    or of an existing one (saved + overrides)."""
    saved = run_dir / "config.json"
    if saved.is_file():
        info = ckpt.read_run_info(run_dir)
        if info["stage"] != kind:
            raise CheckpointError(f"{run_dir} is a {info['stage']} run, not {kind}")
        cfg = Config.load(saved)
        if preset and preset != cfg.preset:
            raise ConfigError(f"{run_dir} was created with preset {cfg.preset!r}, not {preset!r}")
        return apply_overrides(cfg, overrides), True
    cls = STAGES[kind]
    parent = (parents or {}).get(cls.parent_key) if cls.parent_key else None
    if cls.parent_key and not parent:
        flag = "--" + cls.parent_key.replace("_", "-")
        raise CheckpointError(f"training {kind} needs {flag} RUN_DIR (the run it builds on)")
    cfg = build_config(preset or "paper", [], stage=kind)
    if parent:
        if not (Path(parent) / "config.json").is_file():
            raise CheckpointError(f"{parent} is not a diladiff run folder (no config.json)")
        parent_cfg = Config.load(Path(parent) / "config.json")
        for section in cls.inherits:
            setattr(cfg, section, getattr(parent_cfg, section))
    return apply_overrides(cfg, overrides), False


def train_run(
    kind: str,
    run_dir: str | Path,
    preset: str | None = None,
    overrides: list[str] | None = None,
    parents: dict | None = None,
) -> dict:
    """Train (or resume) the stage `kind` in `run_dir`; returns the final metrics."""
    if kind not in STAGES:
        raise ConfigError(f"unknown stage {kind!r}; choose one of {sorted(STAGES)}")
    run_dir = Path(run_dir)
    cfg, resumed = resolve_config(kind, run_dir, preset, list(overrides or []), parents)
    warmup_warnings = check_warmups(cfg.train, STAGES[kind].warmups(cfg))
    env = setup(cfg.train.device)
    try:
        tok = load_tokenizer(cfg.data.tokenizer)
        tok_id = tokenizer_identity(tok)
        if resumed:
            check_same_tokenizer(
                ckpt.read_run_info(run_dir)["tokenizer_identity"], tok_id, f"resuming {run_dir}"
            )
        if env.is_main:
            data = prepare_data(cfg.data, tok, progress=cfg.train.progress)
        barrier(env)
        if not env.is_main:
            data = prepare_data(cfg.data, tok, progress=False)
        torch.manual_seed(cfg.train.seed)
        stage = STAGES[kind](cfg, tok_id)
        if not resumed:
            stage.init_from_parents({k: str(v) for k, v in (parents or {}).items()})
            stage.prepare(data, env.device)
        if env.is_main:
            print(stage.summary())
            for msg in warmup_warnings:  # next to the summary: stderr is kept for errors
                print(f"warning: {msg}")
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.json")
            if not resumed:
                ckpt.write_json_atomic(
                    run_dir / "run.json",
                    {
                        "stage": kind,
                        "tokenizer_identity": tok_id,
                        "parents": {k: str(Path(v).resolve()) for k, v in (parents or {}).items()},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "diladiff": __version__,
                        "data": {k: data.manifest[k] for k in ("train_rows", "val_rows", "source")},
                    },
                )
        barrier(env)
        trainer = Trainer(cfg, stage, data, run_dir, env)
        if trainer.resume() and env.is_main:
            print(f"resumed {run_dir} from step {trainer.step}")
        return trainer.fit()
    finally:
        teardown()


def load_run(
    run_dir: str | Path,
    which: str = "ema",
    device: torch.device | str = "cpu",
    tokenizer: str | None = None,
) -> tuple[Stage, object]:
    """A trained stage with its newest checkpoint's weights, in eval mode, and its tokenizer.

    `tokenizer` overrides the saved one; its vocabulary must match the checkpoint's."""
    run_dir = Path(run_dir)
    info = ckpt.read_run_info(run_dir)
    cfg = Config.load(run_dir / "config.json")
    tok = load_tokenizer(tokenizer or cfg.data.tokenizer)
    check_same_tokenizer(info["tokenizer_identity"], tokenizer_identity(tok), f"loading {run_dir}")
    stage = STAGES[info["stage"]](cfg, info["tokenizer_identity"])
    weights, _ = ckpt.load_weights(run_dir, which)
    stage.load_state_dict(weights)
    return stage.to(device).eval(), tok
