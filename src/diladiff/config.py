"""One configuration system: nested dataclasses, named presets and dotted overrides.

    cfg = build_config("tiny", ["model.depth=4", "train.lr=2e-4"])

Every field has a type; an override is parsed to that type and an unknown key is an error
that names the closest valid keys. A resolved config is saved as JSON in every run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config key or value that cannot be used (unknown key, wrong type, bad preset)."""


@dataclass
class ModelConfig:
    """The bidirectional transformer denoiser (DiT-style blocks, QK-norm, absolute positions)."""

    depth: int = 12
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    # "sdpa": torch scaled_dot_product_attention (fused kernels where available);
    # "math": attention written out explicitly (supports forward-mode AD / torch.func.jvp).
    attention: str = "sdpa"
    compile: bool = False


@dataclass
class DataConfig:
    """Where text comes from and how it is tokenised and packed."""

    # A Hugging Face dataset name ("openwebtext"), a local .txt/.jsonl/.jsonl.gz file or a
    # folder of them, or a built-in corpus ("wiki-vital", "austen", "linux-docs").
    source: str = "openwebtext"
    # Tokenizer: hub name, local path, or the alias "minilm-l6" (offline bert-base-uncased).
    tokenizer: str = "bert-base-uncased"
    seq_len: int = 128
    # The last `heldout_docs` documents of the source are the validation split.
    heldout_docs: int = 100_000
    text_field: str = "text"
    # How a .txt file splits into documents: "blank_line", "line" or "file".
    txt_split: str = "blank_line"
    # Use only the first N documents (0 = all); for quick experiments.
    max_docs: int = 0
    tokenize_batch_docs: int = 1000
    # Token cache; empty = $DILADIFF_CACHE or ~/.cache/diladiff.
    cache_dir: str = ""


@dataclass
class TrainConfig:
    seed: int = 0
    # Global batch (sequences per optimizer step, summed over processes and accumulation).
    batch_size: int = 512
    # Sequences per forward pass per process; 0 = batch_size / world_size (no accumulation).
    micro_batch_size: int = 0
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    warmup_steps: int = 1000
    # Length of the learning-rate schedule; the cosine decays to min_lr_ratio * lr here.
    total_steps: int = 1_000_000
    # Where this invocation stops (0 = total_steps). Raising it on resume continues the run
    # on the same schedule, so 20 + 20 steps equal 40 uninterrupted steps.
    max_steps: int = 0
    schedule: str = "cosine"  # "cosine" or "constant" (after warm-up)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # EMA decay of the weights used for evaluation and sampling (0 disables EMA).
    ema: float = 0.9999
    log_every: int = 10
    eval_every: int = 1000
    eval_batches: int = 8
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16".
    precision: str = "auto"
    # Stop after this many minutes (0 = no limit); a checkpoint is written first.
    time_limit_minutes: float = 0.0
    progress: bool = True


@dataclass
class MDLMConfig:
    """Stage 0: masked diffusion (linear schedule alpha_t = 1 - t)."""

    # Loss weight w(t): "elbo" (1/t) or "constant" (1; the paper's lower-variance choice).
    loss_weight: str = "constant"
    antithetic: bool = True
    # t is drawn in [t_eps, 1] to keep 1/t finite.
    t_eps: float = 1e-3
    # Monte Carlo draws of t per validation sequence for the perplexity bound.
    eval_time_samples: int = 4


@dataclass
class SampleConfig:
    """Masked-diffusion decoding (all knobs of the ancestral sampler)."""

    num_samples: int = 16
    batch_size: int = 16
    # N_disc; 0 = seq_len.
    disc_steps: int = 0
    # "ancestral" (random unmasking, exact reverse process) or "topk" (confidence-based:
    # unmask the k = L / N_disc most confident positions per step).
    strategy: str = "ancestral"
    temperature: float = 1.0
    top_p: float = 1.0
    float64_gumbel: bool = True
    # Reuse the previous step's network output when no token changed (exact: no time input).
    cache: bool = True
    # "fast": the vocabulary head and the token draw only at the positions drawn (revealed ones
    # for ancestral, masked ones for top-k); "reference": the previous sampler, over all
    # (B, L, V) logits every step. Same tokens for the same seed.
    sampler: str = "fast"
    seed: int = 0
    use_ema: bool = True
    # Latent stages: N_cont steps of the latent sampler (LaDiff ODE: 200; DiLaDiff: 5) and
    # DiLaDiff's gamma-sampling (0 = deterministic ODE jumps, 1 = jump to data and re-noise).
    cont_steps: int = 0
    gamma: float = 0.0


@dataclass
class AutoencoderConfig:
    """Stage 1: frozen BERT features -> Perceiver -> latent z (N_z x d_z) -> MDLM decoder."""

    feature_model: str = "bert-base-uncased"  # hub name, path, or "minilm-l6"
    feature_layer: int = -1  # hidden-state index (-1 = last layer)
    # The frozen encoder's compute precision: "auto" = bf16 on CUDA and on CPUs with native bf16
    # (AVX512-BF16 / AMX), fp32 elsewhere; or "fp32" / "bf16".
    feature_precision: str = "auto"
    num_latents: int = 64  # N_z
    latent_dim: int = 768  # d_z; compression = L * d_bert / (N_z * d_z) = 2 at paper size
    # Perceiver width; 0 = latent_dim (the paper's choice). A width below d_z leaves
    # d_z - width directions of every latent vector without variance.
    perceiver_width: int = 0
    perceiver_depth: int = 2
    perceiver_heads: int = 12
    # Feature augmentation (training only): half the batch has positions of h masked with
    # p_mask_h, the other half Gaussian noise of std sigma_h. (Values not given in DESIGN.md.)
    p_mask_h: float = 0.15
    sigma_h: float = 0.1
    # Latent augmentation: each latent vector masked with p_mask_z; with p_drop the whole latent
    # is replaced by N(0, I) (the paper's value was lost; it is above 0.5).
    p_mask_z: float = 0.1
    p_drop: float = 0.6
    # Decoder blocks followed by a cross-attention layer ("first,last" or indices "0,5").
    cross_attn_after: str = "first,last"
    # Position tables on the queries/keys between sequence and latent (nets/positions.py;
    # sinusoidal at init, learned). Not in DESIGN.md: without them a small, briefly trained
    # MDLM decoder's masked positions all ask the latent the same question and the latent goes
    # unused (nets/cross_attention.py). False = the paper's architecture as described.
    position_embeddings: bool = True
    # Warm-ups: new parameters (encoder + cross-attention) and the pretrained decoder; the
    # decoder's learning rate is decoder_lr_scale x train.lr (1 = the paper's single rate).
    encoder_warmup_steps: int = 1000
    decoder_warmup_steps: int = 10000
    decoder_lr_scale: float = 1.0


@dataclass
class PriorConfig:
    """Stage 2 network: the x0-predicting transformer over the N_z latent vectors.

    Its output layer maps width -> d_z, so with width < d_z every clean-latent prediction lies
    in a width-dimensional subspace of each latent vector's d_z; along the other directions
    the probability-flow ODE contracts the noise to 0 at t = 0 and the samples have no
    variance there. The presets keep width >= d_z."""

    depth: int = 12
    width: int = 768
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass
class DiffusionConfig:
    """Stage 2 process: VP, warped tangent schedule alpha_t^2 = 1/(1 + d^2 tan^2(pi t/2))."""

    d: float = 10.0
    self_cond_prob: float = 0.5
    t_eps: float = 1e-4
    # Clean training rows (drawn at random) whose frozen-encoder latents give the prior-space
    # standardisation, estimated once when a LaDiff run starts; 0 or more than there are = all.
    latent_stats_rows: int = 4096


@dataclass
class MeanFlowConfig:
    """Stage 3: MeanFlow self-distillation of the prior (teacher frozen)."""

    r_equals_t_prob: float = 0.25
    logit_normal_mean: float = -1.0
    logit_normal_std: float = 1.0
    adaptive_p: float = 1.0  # loss / (||delta||^2 + c)^p, detached
    adaptive_c: float = 1e-3
    tangent_warmup_steps: int = 10000
    # Share of training examples on which the student is self-conditioned on its own r = t
    # clean estimate (stop-gradient); the others get zeros, as the first pass of a sampling step.
    student_self_cond_prob: float = 0.5
    # "jvp" (exact forward-mode AD) or "finite_difference" (central difference of step fd_eps;
    # the time embedding's 1000 t scale makes t-derivatives steep: keep fd_eps small).
    derivative: str = "jvp"
    fd_eps: float = 1e-4


@dataclass
class Config:
    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mdlm: MDLMConfig = field(default_factory=MDLMConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    meanflow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        cfg = cls()
        for key, value in _flatten(d):
            set_value(cfg, key, value)
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- presets


def _paper() -> Config:
    """The paper's setting: GPT-2-small-sized (12 x 768), L = 128, batch 512, 1M steps."""
    return Config(preset="paper")


def _small() -> Config:
    """One H100, a run of about 10 minutes on the offline real corpora."""
    cfg = Config(preset="small")
    cfg.model = ModelConfig(depth=8, width=512, heads=8)
    cfg.data = DataConfig(
        source="wiki-vital+austen+linux-docs", tokenizer="minilm-l6", seq_len=128, heldout_docs=200
    )
    cfg.train = TrainConfig(
        batch_size=256,
        lr=5e-4,
        warmup_steps=500,
        total_steps=6000,
        ema=0.999,
        eval_every=1000,
        ckpt_every=1000,
        eval_batches=16,
    )
    # d_bert = 384; compression (L d_bert) / (N_z d_z) = 128 * 384 / (32 * 768) = 2.
    cfg.autoencoder = AutoencoderConfig(
        feature_model="minilm-l6", num_latents=32, latent_dim=768, perceiver_heads=12
    )
    return cfg


def _tiny() -> Config:
    """Trains on 2 CPU cores in minutes (the demo and the tests)."""
    cfg = Config(preset="tiny")
    cfg.model = ModelConfig(depth=3, width=128, heads=4)
    cfg.data = DataConfig(source="wiki-vital", tokenizer="minilm-l6", seq_len=64, heldout_docs=300)
    cfg.train = TrainConfig(
        batch_size=32,
        lr=2e-3,
        warmup_steps=50,
        total_steps=2000,
        ema=0.99,
        log_every=10,
        eval_every=250,
        ckpt_every=250,
        eval_batches=4,
    )
    cfg.sample = SampleConfig(num_samples=8, batch_size=8)
    # d_bert = 384; compression (L d_bert) / (N_z d_z) = 64 * 384 / (32 * 384) = 2.
    cfg.autoencoder = AutoencoderConfig(
        feature_model="minilm-l6", num_latents=32, latent_dim=384, perceiver_heads=6
    )
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": _tiny,
    "small": _small,
    "paper": _paper,
}

# What each stage changes in a preset (the paper's learning rates and warm-ups; the step
# counts of the latent stages are not given by DESIGN.md and are this project's choices).
STAGE_DEFAULTS: dict[tuple[str, str], list[str]] = {
    ("autoencoder", "paper"): [
        "train.lr=5e-5",
        "train.total_steps=100000",
        "train.warmup_steps=1000",
    ],
    ("autoencoder", "small"): [
        "train.lr=2e-4",
        "train.total_steps=3000",
        "autoencoder.encoder_warmup_steps=100",
        "autoencoder.decoder_warmup_steps=500",
    ],
    ("autoencoder", "tiny"): [
        "train.lr=2e-3",
        "train.total_steps=600",  # the latent starts to pay off between 250 and 500 steps
        "autoencoder.decoder_lr_scale=0.1",
        "autoencoder.encoder_warmup_steps=20",
        "autoencoder.decoder_warmup_steps=100",
    ],
    ("ladiff", "paper"): [
        "train.lr=2e-4",
        "train.total_steps=500000",
        "train.warmup_steps=1000",
        "sample.cont_steps=200",
    ],
    ("ladiff", "small"): [
        "train.lr=3e-4",
        "train.total_steps=4000",
        "prior.depth=8",
        "prior.width=768",  # = d_z: see PriorConfig
        "prior.heads=12",
        "sample.cont_steps=200",
    ],
    ("ladiff", "tiny"): [
        "train.lr=1e-3",
        "train.total_steps=600",
        "prior.depth=3",
        "prior.width=384",  # = d_z: see PriorConfig
        "prior.heads=6",
        "diffusion.latent_stats_rows=2048",
        "sample.cont_steps=200",
    ],
    ("diladiff", "paper"): [
        "train.lr=5e-5",
        "train.total_steps=100000",
        "train.warmup_steps=1000",
        "sample.cont_steps=5",
    ],
    ("diladiff", "small"): [
        "train.lr=1e-4",
        "train.total_steps=2000",
        "meanflow.tangent_warmup_steps=500",
        "sample.cont_steps=5",
    ],
    ("diladiff", "tiny"): [
        "train.lr=5e-4",
        "train.total_steps=300",
        "train.warmup_steps=20",
        "meanflow.tangent_warmup_steps=100",
        "sample.cont_steps=5",
    ],
}


def build_config(
    preset: str = "paper", overrides: typing.Sequence[str] = (), stage: str = "mdlm"
) -> Config:
    """The named preset, adjusted for `stage`, with `key=value` overrides applied in order.

    A "-4x" suffix (e.g. "tiny-4x") halves d_z: 4x compression instead of 2x."""
    base = preset.removesuffix("-4x")
    if base not in PRESETS:
        raise ConfigError(
            f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} (optionally with -4x)"
        )
    cfg = PRESETS[base]()
    apply_overrides(cfg, STAGE_DEFAULTS.get((stage, base), []))
    if preset.endswith("-4x"):
        cfg.autoencoder.latent_dim //= 2
    cfg.preset = preset
    apply_overrides(cfg, overrides)
    return cfg


def check_warmups(train: TrainConfig, warmups: dict[str, int]) -> list[str]:
    """Compare a run's length with its warm-ups (config key -> steps).

    A schedule (train.total_steps) shorter than a warm-up can never finish it: ConfigError.
    A stop point (train.max_steps) before the end of a warm-up is allowed (a run can be
    continued later) but returns a warning for each warm-up it cuts short."""
    short = {k: v for k, v in warmups.items() if v > train.total_steps}
    if short:
        names = ", ".join(f"{k}={v}" for k, v in short.items())
        raise ConfigError(
            f"train.total_steps={train.total_steps} is shorter than the warm-up {names}: "
            "raise train.total_steps or shorten the warm-up"
        )
    stop = train.max_steps or train.total_steps
    return [
        f"train.max_steps={stop} stops before the warm-up {k}={v} ends"
        for k, v in warmups.items()
        if v > stop
    ]


# --------------------------------------------------------------------------- overrides


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of a config (leaf fields only)."""
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip(), raw.strip(), from_string=True)
    return cfg


def set_value(cfg: Any, key: str, value: Any, from_string: bool = False) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = (
            {f.name: f for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else {}
        )
        if part not in names:
            close = difflib.get_close_matches(key, all_keys(cfg), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"config key {key!r} is a section, not a value")
            hint = typing.get_type_hints(type(obj))[part]
            setattr(obj, part, _coerce(key, value, hint, from_string))
        else:
            obj = getattr(obj, part)


def _coerce(key: str, value: Any, hint: Any, from_string: bool) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None or (from_string and str(value).lower() in ("none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return (
                int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
            )
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} expects {hint.__name__}, got {value!r}") from None
    raise ConfigError(f"config key {key!r} has unsupported type {hint}")


def _flatten(d: dict[str, Any], prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v
