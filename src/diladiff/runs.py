"""Run folders end to end: create or resume a training run, and load a trained stage.

train_run("mdlm", "runs/m", preset="tiny", overrides=["train.max_steps=20"])
stage, tok = load_run("runs/m")            # EMA weights, ready to sample

A run folder holds a copy of its tokenizer (RUN/tokenizer/, written when the run is created), so
it loads where data.tokenizer's cache or corpus is missing (a corpus BPE, `bpe-N`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diladiff.config import (
    PARALLEL,
    Config,
    ConfigError,
    apply_overrides,
    build_config,
    check_warmups,
)
from diladiff.data.packing import prepare_data
from diladiff.data.tokenizer import (
    TOKENIZER_DIR,
    check_same_tokenizer,
    load_tokenizer,
    resolve_tokenizer,
    save_tokenizer,
    tokenizer_identity,
)
from diladiff.errors import CheckpointError
from diladiff.stages import STAGES, Stage
from diladiff.train import checkpoint as ckpt
from diladiff.train.distributed import barrier, setup, teardown
from diladiff.train.trainer import LOGGERS, Trainer
from diladiff.version import __version__


def check_parents(kind: str, parents: dict | None) -> dict[str, Path]:
    """The parent run folders of a new `kind` run, one per declared role, each a run of the
    declared stage kind (role = CLI flag without "--")."""
    parents = {k: Path(v) for k, v in (parents or {}).items() if v}
    roles = STAGES[kind].parents
    extra = sorted(set(parents) - set(roles))
    if extra:
        raise ConfigError(f"{kind} takes no parent {extra}; its parents: {roles or 'none'}")
    for role, parent_kind in roles.items():
        flag = "--" + role.replace("_", "-")
        if role not in parents:
            raise CheckpointError(f"training {kind} needs {flag} RUN_DIR (a run of {parent_kind})")
        run = parents[role]
        if not (run / "config.json").is_file() or not (run / "run.json").is_file():
            raise CheckpointError(f"{flag} {run} is not a diladiff run folder (no config.json)")
        found = run_kind(run)
        if found != parent_kind:
            raise CheckpointError(f"{flag} {run} is a run of {found}, not of {parent_kind}")
    return parents


def resolve_config(
    kind: str, run_dir: Path, preset: str | None, overrides: list[str], parents: dict | None = None
) -> tuple[Config, bool, dict[str, Path]]:
    """The config of a new run (preset + sections inherited from the parent run + overrides)
    or of an existing one (saved + overrides), whether it resumes, and the checked parent run
    folders of a new run ({} on resume: its parents were used when it started)."""
    saved = run_dir / "config.json"
    if saved.is_file():
        info = ckpt.read_run_info(run_dir)
        if info["stage"] != kind:
            raise CheckpointError(f"{run_dir} is a {info['stage']} run, not {kind}")
        cfg = Config.load(saved)
        if preset and preset != cfg.preset:
            raise ConfigError(f"{run_dir} was created with preset {cfg.preset!r}, not {preset!r}")
        return apply_overrides(cfg, overrides), True, {}
    cls = STAGES[kind]
    parents = check_parents(kind, parents)
    cfg = build_config(preset or "paper", [], stage=kind)
    if parents and cls.inherits:
        if len(parents) != 1:
            raise ConfigError(f"{kind}: `inherits` needs a single parent, it has {list(parents)}")
        parent_cfg = Config.load(next(iter(parents.values())) / "config.json")
        for section in cls.inherits:
            setattr(cfg, section, getattr(parent_cfg, section))
    return apply_overrides(cfg, overrides), False, parents


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
    cfg, resumed, parents = resolve_config(kind, run_dir, preset, list(overrides or []), parents)
    if cfg.train.logger not in LOGGERS:  # before anything is written
        raise ConfigError(f"train.logger must be one of {LOGGERS}, not {cfg.train.logger!r}")
    if cfg.train.parallel not in PARALLEL:
        raise ConfigError(f"train.parallel must be one of {PARALLEL}, not {cfg.train.parallel!r}")
    warmup_warnings = check_warmups(cfg.train, STAGES[kind].warmups(cfg))
    env = setup(cfg.train.device)
    try:
        # The main process trains a corpus BPE if it has to; the others then find it cached.
        if env.is_main:
            tok = training_tokenizer(cfg, run_dir, resumed, cfg.train.progress)
        barrier(env)
        if not env.is_main:
            tok = training_tokenizer(cfg, run_dir, resumed, progress=False)
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
            stage.init_from_parents({role: load_run(run)[0] for role, run in parents.items()})
        stage.attach(data, env.device, tok)  # every start, e.g. a feature cache of `data`
        if not resumed:
            stage.prepare(data, env.device)
        if env.is_main:
            print(stage.summary())
            for msg in warmup_warnings:  # next to the summary: stderr is kept for errors
                print(f"warning: {msg}")
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / "config.json")
            if not has_tokenizer_copy(run_dir):  # a new run (or one made before the copies)
                save_tokenizer(tok, run_dir / TOKENIZER_DIR)
            if not resumed:
                ckpt.write_json_atomic(
                    run_dir / "run.json",
                    {
                        "stage": kind,
                        "tokenizer_identity": tok_id,
                        "parents": {k: str(v.resolve()) for k, v in parents.items()},
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        "diladiff": __version__,
                        "data": {k: data.manifest[k] for k in ("train_rows", "val_rows", "source")},
                    },
                )
        barrier(env)
        trainer = Trainer(cfg, stage, data, run_dir, env)
        if trainer.resume() and env.is_main:
            print(f"resumed {run_dir} from step {trainer.step}")
        metrics = trainer.fit()
        barrier(env)  # no rank leaves the process group while another still uses it
        return metrics
    finally:
        teardown()


def has_tokenizer_copy(folder: Path) -> bool:
    """Whether a run folder holds its tokenizer's copy (written atomically: whole if there)."""
    return (folder / TOKENIZER_DIR / "tokenizer_config.json").is_file()


def training_tokenizer(cfg: Config, run_dir: Path, resumed: bool, progress: bool = True):
    """The tokenizer a run trains with: a resumed run's own copy while data.tokenizer is still
    the name it was created with (nothing to resolve or retrain), else data.tokenizer resolved
    (a corpus BPE found in the cache or trained on the training split)."""
    if resumed and has_tokenizer_copy(run_dir):
        created = Config.load(run_dir / "config.json").data.tokenizer
        if created == cfg.data.tokenizer:
            return load_tokenizer(str(run_dir / TOKENIZER_DIR))
    return load_tokenizer(resolve_tokenizer(cfg.data, progress))


def run_tokenizer(run_dir: str | Path):
    """The tokenizer of a run folder: its copy RUN/tokenizer/, or for a run made before the
    copies its config's data.tokenizer (a corpus BPE then needs its cache or its corpus)."""
    run_dir = Path(run_dir)
    if has_tokenizer_copy(run_dir):
        return load_tokenizer(str(run_dir / TOKENIZER_DIR))
    return load_tokenizer(Config.load(run_dir / "config.json").data)


def run_kind(run_dir: str | Path) -> str:
    """The stage kind of a run folder (from its run.json)."""
    return ckpt.read_run_info(Path(run_dir))["stage"]


def run_parents(run_dir: str | Path) -> dict[str, Path]:
    """The parent runs a run was built on (role -> folder, as recorded in its run.json)."""
    return {k: Path(v) for k, v in ckpt.read_run_info(Path(run_dir)).get("parents", {}).items()}


def load_run(
    run_dir: str | Path,
    which: str = "ema",
    device: torch.device | str = "cpu",
    tokenizer: str | None = None,
) -> tuple[Stage, object]:
    """A trained stage with its newest checkpoint's weights, in eval mode, and its tokenizer.

    `tokenizer` (a hub name, path or alias) overrides the run's own (`run_tokenizer`); its
    vocabulary must match the checkpoint's."""
    run_dir = Path(run_dir)
    info = ckpt.read_run_info(run_dir)
    cfg = Config.load(run_dir / "config.json")
    tok = load_tokenizer(tokenizer) if tokenizer else run_tokenizer(run_dir)
    check_same_tokenizer(info["tokenizer_identity"], tokenizer_identity(tok), f"loading {run_dir}")
    stage = STAGES[info["stage"]](cfg, info["tokenizer_identity"])
    stage.use_tokenizer(tok)  # the run's own copy: no corpus or BPE cache needed
    weights, _ = ckpt.load_weights(run_dir, which)
    stage.load_state_dict(weights)
    return stage.to(device).eval(), tok
