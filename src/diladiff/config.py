"""One configuration system: nested dataclasses, named presets and dotted overrides.

    cfg = build_config("tiny", ["model.depth=4", "train.lr=2e-4"])

Every field has a type; an override is parsed to that type and an unknown key is an error
that names the closest valid keys. A file of values (`--config FILE`: JSON or TOML, nested
sections or dotted keys; a run's config.json works) becomes overrides (`overrides_from_file`)
applied before the command line's. A resolved config is saved as JSON in every run folder.

Ranges and relations are declared beside each field, as typing.Annotated metadata:

    width: Annotated[int, Range(ge=1), DivisibleBy("heads")] = 768

(`Range`, `OneOf`, `NotEmpty`, `DivisibleBy`, `AtMost`, `Satisfies`). `validate` checks them all,
for every section, when a configuration is resolved (`build_config`, `apply_overrides`,
`Config.from_dict`), so a configuration that cannot run stops with one ConfigError before any
run folder, cache or model exists; a command-line option that sets a key is checked by the same
declarations (`parse_option`). Every int must fit in 64 bits and every float be finite.

The core sections (model, data, train, sample, prior) live here. A method owns its own
sections: it declares them with `register_section(name, cls, presets)` next to its stage
(e.g. `autoencoder` in methods/autoencoder/stage.py), and every Config built afterwards has
them. A stage's
per-preset training changes (learning rate, steps, warm-ups) are typed code registered with the
stage (`Stage.preset_changes`, applied by `build_config(..., stage=KIND)`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any


class ConfigError(ValueError):
    """A config key or value that cannot be used (unknown key, wrong type, bad preset)."""


# --------------------------------------------------------------------------- declared rules


class Rule:
    """A constraint declared beside a config field (typing.Annotated metadata), checked by
    `validate`. `problem(value, key, cfg)` says in words what is wrong, or returns None;
    cfg None: the value of a command-line option on its own (`parse_option`), where a rule
    that compares with other keys (own = False) is not checked and a Range's unset value is
    refused (leaving the option out gives the default)."""

    own: typing.ClassVar[bool] = True

    def problem(self, value: Any, key: str, cfg: Config | None) -> str | None:
        raise NotImplementedError


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Range(Rule):
    """Bounds of a number (ge, gt, le, lt) and optionally one value outside them that stands
    for a default (`unset`, e.g. 0 = "all"), said in words by `means`, or, when it stands for
    another key's value, by `same_as` (relations to this key then see that value)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    unset: float | None = None
    means: str = ""
    same_as: str = ""

    def describe(self, integer: bool, with_unset: bool = True, key: str = "") -> str:
        lo = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">")
        hi = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<")
        if lo[0] is not None and hi[0] is not None:
            text = f"in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
        else:
            end = lo if lo[0] is not None else hi
            text = f"{end[2]} {_num(end[0])}"
        text = f"an integer {text}" if integer else text
        if with_unset and self.unset is not None:
            means = self.means or (f"= {_sibling(self.same_as, key)}" if self.same_as else "")
            text += f", or {_num(self.unset)}" + (f" ({means})" if means else "")
        return text

    def problem(self, value, key, cfg):
        if cfg is not None and value == self.unset:
            return None
        if (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        ):
            return None
        integer = isinstance(value, int) and not isinstance(value, bool)
        return f"{key} must be {self.describe(integer, cfg is not None, key)}, got {value!r}"


@dataclass(frozen=True)
class OneOf(Rule):
    """A name from a set: a collection (referenced, not copied), or "module:NAME" naming a
    registry of a module above this one (imported when checked, after `filled_by`: the module
    whose import registers every entry). `empty`: what "" stands for, if it is allowed."""

    choices: Any
    filled_by: str = ""
    empty: str = ""

    def names(self) -> list[str]:
        choices = self.choices
        if isinstance(choices, str):
            if self.filled_by:
                importlib.import_module(self.filled_by)
            module, name = choices.split(":")
            choices = getattr(importlib.import_module(module), name)
        return sorted(choices) if isinstance(choices, dict | set | frozenset) else list(choices)

    def describe(self) -> str:
        empty = f", or '' ({self.empty})" if self.empty else ""
        return f"one of {tuple(self.names())}{empty}"

    def problem(self, value, key, cfg):
        if value in self.names() or (self.empty and value == ""):
            return None
        close = difflib.get_close_matches(str(value), self.names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key} must be {self.describe()}, got {value!r}{hint}"


@dataclass(frozen=True)
class NotEmpty(Rule):
    """A name that must be given (a data source, a model)."""

    def problem(self, value, key, cfg):
        return None if value.strip() else f"{key} must not be empty"


def _sibling(ref: str, key: str) -> str:
    """A rule's reference to another key: a field of the same section, or a dotted key."""
    return ref if "." in ref or "." not in key else f"{key.rsplit('.', 1)[0]}.{ref}"


@dataclass(frozen=True)
class DivisibleBy(Rule):
    """A multiple of `factor` x another key's value (a width of its heads); `why` says why."""

    ref: str
    factor: int = 1
    why: str = ""
    own: typing.ClassVar[bool] = False

    def problem(self, value, key, cfg):
        ref = _sibling(self.ref, key)
        other = effective_value(cfg, ref)
        if _is_int(other) and other >= 1 and value % (self.factor * other):
            times = f"{self.factor} x " if self.factor != 1 else ""
            why = f" ({self.why})" if self.why else ""
            return f"{key}={value} must be divisible by {times}{ref}={other}{why}"
        return None  # else a bad value of the other key is reported on its own


@dataclass(frozen=True)
class AtMost(Rule):
    """At most (`strict`: below) another key's value."""

    ref: str
    strict: bool = False
    own: typing.ClassVar[bool] = False

    def problem(self, value, key, cfg):
        ref = _sibling(self.ref, key)
        other = effective_value(cfg, ref)
        if isinstance(other, int | float) and (value >= other if self.strict else value > other):
            return f"{key}={value} must be {'below' if self.strict else 'at most'} {ref}={other}"
        return None


@dataclass(frozen=True)
class Satisfies(Rule):
    """Any other condition: `check(value, cfg)` returns what is wrong in words (or raises
    ConfigError / ValueError saying it), else None. Name a module-level function: annotations
    are evaluated when first checked, in the class's namespace, where a lambda would not see
    the module's names (a function or constant defined further down the module is fine)."""

    check: typing.Callable[[Any, Config], str | None]
    own: typing.ClassVar[bool] = False

    def problem(self, value, key, cfg):
        try:
            found = self.check(value, cfg)
        except (ConfigError, ValueError) as exc:
            found = str(exc)
        return found if found is None or key in found else f"{key}: {found}"


# Choice sets of the core sections that no module below the config owns as a constant.
TXT_SPLITS = ("blank_line", "line", "file")  # data.txt_split (data.sources)
LR_SCHEDULES = ("cosine", "constant")  # train.schedule (train.schedule.lr_factor)
# The registries of sample.strategy and sample.latent_sampler (filled when SAMPLERS_MODULE,
# which imports every sampler module, is imported).
STRATEGIES = "diladiff.sampling.masked:STRATEGIES"
LATENT_SAMPLERS = "diladiff.sampling.latent:LATENT_SAMPLERS"
SAMPLERS_MODULE = "diladiff.sampling.generate"


def _streaming_needs_max_docs(streaming: bool, cfg: Config) -> str | None:
    """A stream has no end to hold documents out from: it takes data.max_docs documents."""
    if streaming and cfg.data.max_docs < 1:
        return "data.streaming=true needs data.max_docs > 0 (the documents taken from the stream)"
    return None


def _device_spec(device: str, cfg: Config) -> str | None:
    """ "auto", or a device torch knows ("cpu", "cuda", "cuda:1", ...; whether it is present
    is checked when the run starts)."""
    if device == "auto":
        return None
    import torch  # only here: the config itself needs no torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        return (
            f"train.device must be auto or a torch device (cpu, cuda, cuda:1, ...), got {device!r}"
        )
    return None


def _rope_needs_even_heads(positions: str, cfg: Config) -> str | None:
    """RoPE rotates pairs of a head's dimensions: the head width must be even."""
    m = cfg.model
    if positions == "rope" and m.heads and (m.width // m.heads) % 2:
        head = m.width / m.heads
        return f"model.positions=rope needs an even head width (model.width / heads = {head:g})"
    return None


def _gamma_needs_meanflow(gamma: float, cfg: Config) -> str | None:
    """gamma-sampling re-noises MeanFlow jumps; the other latent samplers refuse it."""
    sampler = cfg.sample.latent_sampler
    if gamma and sampler not in ("", "meanflow"):
        return f"sample.gamma={gamma:g} applies to the meanflow latent sampler, not {sampler}"
    return None


@dataclass
class ModelConfig:
    """The bidirectional transformer denoiser (DiT-style blocks, QK-norm)."""

    depth: Annotated[int, Range(ge=1)] = 12
    width: Annotated[int, Range(ge=1), DivisibleBy("heads")] = 768
    heads: Annotated[int, Range(ge=1)] = 12
    mlp_ratio: Annotated[float, Range(gt=0)] = 4.0
    qk_norm: bool = True
    # "sdpa": torch scaled_dot_product_attention (fused kernels where available);
    # "math": attention written out explicitly (supports forward-mode AD / torch.func.jvp).
    attention: Annotated[str, OneOf("diladiff.nets.transformer:ATTENTION_BACKENDS")] = "sdpa"
    # "learned": an absolute position table added to the input (the paper's denoiser);
    # "rope": rotary embeddings of queries and keys (the MDLM authors' code). On real text at
    # small scale the learned table leaves the MDLM a bag of words for ~1,000 steps (RESULTS.md,
    # "Positions"). It sets the token denoisers built from this section: MDLM, DUO and the
    # auto-encoder's decoder. LDLM's feature decoder and the latent DiTs keep a learned table,
    # LADD's MM-DiT always uses RoPE.
    positions: Annotated[
        str,
        OneOf("diladiff.nets.transformer:POSITIONS"),
        Satisfies(_rope_needs_even_heads),
    ] = "learned"
    compile: bool = False


@dataclass
class DataConfig:
    """Where text comes from and how it is tokenised and packed."""

    # A Hugging Face dataset name ("openwebtext"), a local .txt/.jsonl/.jsonl.gz file or a
    # folder of them, or a built-in corpus ("wiki-vital", "austen", "linux-docs").
    source: Annotated[str, NotEmpty()] = "openwebtext"
    # Hub datasets only: the dataset's config name, a git revision (branch, tag, commit or
    # "refs/convert/parquet"), the split, and streaming (no full download; needs
    # data.max_docs > 0: the documents taken from the stream, the last heldout_docs held out).
    hub_config: str = ""
    hub_revision: str = ""
    hub_split: Annotated[str, NotEmpty()] = "train"
    streaming: Annotated[bool, Satisfies(_streaming_needs_max_docs)] = False
    # Tokenizer: hub name, local path, the alias "minilm-l6" (offline bert-base-uncased), or
    # "bpe-N" / "bpe-N-lower": a byte-level BPE of N tokens trained once on data.source's
    # training split and cached (diladiff.data.bpe); every run folder keeps a copy.
    tokenizer: Annotated[str, NotEmpty()] = "bert-base-uncased"
    seq_len: Annotated[int, Range(ge=1)] = 128
    # The last `heldout_docs` documents of the source are the validation split.
    heldout_docs: Annotated[int, Range(ge=1), AtMost("max_docs", strict=True)] = 100_000
    text_field: Annotated[str, NotEmpty()] = "text"
    # How a .txt file splits into documents: "blank_line", "line" or "file".
    txt_split: Annotated[str, OneOf(TXT_SPLITS)] = "blank_line"
    # Use only the first N documents (0 = all); for quick experiments.
    max_docs: Annotated[int, Range(ge=1, unset=0, means="all")] = 0
    tokenize_batch_docs: Annotated[int, Range(ge=1)] = 1000
    # Token cache; empty = $DILADIFF_CACHE or ~/.cache/diladiff.
    cache_dir: str = ""


@dataclass
class TrainConfig:
    seed: Annotated[int, Range(ge=0)] = 0
    # Global batch (sequences per optimizer step, summed over processes and accumulation).
    batch_size: Annotated[int, Range(ge=1), DivisibleBy("micro_batch_size")] = 512
    # Sequences per forward pass per process; 0 = batch_size / world_size (no accumulation).
    micro_batch_size: Annotated[int, Range(ge=1, unset=0, means="batch_size / processes")] = 0
    lr: Annotated[float, Range(gt=0)] = 3e-4
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.999
    weight_decay: Annotated[float, Range(ge=0)] = 0.0
    warmup_steps: Annotated[int, Range(ge=0)] = 1000
    # Length of the learning-rate schedule; the cosine decays to min_lr_ratio * lr here.
    total_steps: Annotated[int, Range(ge=1)] = 1_000_000
    # Where this invocation stops (0 = total_steps). Raising it on resume continues the run
    # on the same schedule, so 20 + 20 steps equal 40 uninterrupted steps.
    max_steps: Annotated[int, Range(ge=1, unset=0, same_as="total_steps")] = 0
    # "cosine" or "constant" (after warm-up).
    schedule: Annotated[str, OneOf(LR_SCHEDULES)] = "cosine"
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.0
    grad_clip: Annotated[float, Range(gt=0, unset=0, means="no clipping")] = 1.0
    # EMA decay of the weights used for evaluation and sampling (0 disables EMA).
    ema: Annotated[float, Range(ge=0, lt=1)] = 0.9999
    log_every: Annotated[int, Range(ge=1)] = 10
    eval_every: Annotated[int, Range(ge=1)] = 1000
    # Held-out batches per evaluation (0 = all held-out rows).
    eval_batches: Annotated[int, Range(ge=1, unset=0, means="all held-out rows")] = 8
    ckpt_every: Annotated[int, Range(ge=1)] = 1000
    keep_checkpoints: Annotated[int, Range(ge=1, unset=0, means="keep all")] = 2
    # "auto", "cpu", "cuda", "cuda:1", ...
    device: Annotated[str, Satisfies(_device_spec)] = "auto"
    # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16".
    precision: Annotated[str, OneOf("diladiff.runtime:PRECISIONS")] = "auto"
    # Stop after this many minutes (0 = no limit); a checkpoint is written first.
    time_limit_minutes: Annotated[float, Range(ge=0)] = 0.0
    progress: bool = True
    # "tensorboard": also write every logged value to RUN/tensorboard (the `tensorboard` extra;
    # `tensorboard --logdir runs/`); "none": log.jsonl and curve.png only.
    logger: Annotated[str, OneOf("diladiff.train.trainer:LOGGERS")] = "none"
    # Data parallelism under torchrun (more than one process; a single process always trains
    # the plain module, so the same command and checkpoint work at any world size):
    # "ddp" (DistributedDataParallel: every process holds the whole model, its gradients and
    # AdamW state) or "fsdp" (torch's FSDP2 fully_shard: the trainable parameters, gradients
    # and AdamW state are sharded across processes, gathered per transformer block where the
    # stage allows it (stages/base.py fsdp_per_block), else once per forward; frozen parts,
    # e.g. a frozen auto-encoder or teacher, stay replicated; train/sharding.py). Checkpoints
    # hold full tensors either way: a run can resume under the other one.
    parallel: Annotated[str, OneOf(PARALLEL)] = "ddp"


PARALLEL = ("ddp", "fsdp")  # train.parallel


@dataclass(frozen=True)
class Help:
    """A key's help line, shown where a command-line option sets it (the sampling options of
    `diladiff sample` / `bench sample` derive from SampleConfig's fields and their Help)."""

    text: str


def field_help(cls: type) -> dict[str, str]:
    """Field name -> its Help text, for the fields of a config dataclass that declare one."""
    return {
        name: m.text
        for name, (_, metadata) in field_annotations(cls).items()
        for m in metadata
        if isinstance(m, Help)
    }


@dataclass
class SampleConfig:
    """Sampling: masked-diffusion decoding (sampling.masked.SamplerSettings) and, for latent
    stages, the latent sampler (sampling.latent.LatentSettings). The one definition of every
    sampling setting: `diladiff sample`'s options (cli.sampling_options) and
    `diladiff.load(...).generate(**settings)` take exactly these keys."""

    num_samples: Annotated[int, Range(ge=1), Help("how many rows to generate")] = 16
    batch_size: Annotated[int, Range(ge=1), Help("rows per forward pass")] = 16
    disc_steps: Annotated[
        int, Range(ge=1, unset=0, same_as="data.seq_len"), Help("N_disc (0 = L)")
    ] = 0
    strategy: Annotated[
        str,
        OneOf(STRATEGIES, filled_by=SAMPLERS_MODULE),
        Help(
            "which masked positions each step reveals: ancestral (random unmasking, the exact "
            "reverse process), topk (the k = L / N_disc most confident), threshold (every "
            "position above confidence_threshold, at least one per row and step), greedy_tail "
            "(DUO: argmax at the last step)"
        ),
    ] = "ancestral"
    confidence_threshold: Annotated[
        float,
        Range(gt=0, le=1),
        Help("the threshold strategy: reveal every token drawn with a probability above this"),
    ] = 0.9
    temperature: Annotated[
        float, Range(gt=0), Help("divides the logits before every token draw")
    ] = 1.0
    top_p: Annotated[
        float,
        Range(gt=0, le=1),
        Help("nucleus sampling: keep the smallest set of tokens with this probability mass"),
    ] = 1.0
    float64_gumbel: Annotated[
        bool, Help("draw the Gumbel noise of token draws in float64 (fp32 ties at large V)")
    ] = True
    cache: Annotated[
        bool,
        Help(
            "reuse the previous step's network output when no token changed (exact: no time "
            "input); --no-cache recomputes every step"
        ),
    ] = True
    sampler: Annotated[
        str,
        OneOf("diladiff.sampling.masked:SAMPLERS"),
        Help(
            "fast: the vocabulary head and the token draw only at the positions drawn; "
            "reference: the previous full-vocabulary sampler (same samples, slower)"
        ),
    ] = "fast"
    seed: Annotated[int, Help("random seed (the same seed gives the same samples)")] = 0
    # Latent stages (sampling.latent.LatentSettings): each latent stage's presets set its own
    # latent sampler and N_cont.
    latent_sampler: Annotated[
        str,
        OneOf(LATENT_SAMPLERS, filled_by=SAMPLERS_MODULE, empty="the stage's own"),
        Help("latent stages: the latent sampler"),
    ] = ""
    cont_steps: Annotated[
        int,
        Range(ge=1, unset=0, means="LADD: ladd.latent_steps; unused without a latent"),
        Help("N_cont of a latent stage's sampler (LADD: its sequential latent steps)"),
    ] = 0
    gamma: Annotated[
        float,
        Range(ge=0, le=1),
        Satisfies(_gamma_needs_meanflow),
        Help("MeanFlow gamma-sampling (0 = deterministic, 1 = jump to data and re-noise)"),
    ] = 0.0
    time_grid: Annotated[
        str,
        OneOf("diladiff.sampling.latent:TIME_GRIDS", empty="the model's own"),
        Help(
            "latent stages: the sampler's N_cont + 1 times, uniform in t or evenly spaced in "
            "the schedule angle (where second-order solvers do best); '' = the model's own"
        ),
    ] = ""
    inference: Annotated[
        str,
        OneOf("diladiff.methods.ladd.sampler:INFERENCES"),
        Help(
            "stages sampling tokens and latent with one network (LADD): both channels every "
            "step (joint), or the latent first in cont_steps steps (sequential)"
        ),
    ] = "joint"


@dataclass
class PriorConfig:
    """Stage 2 network: the x0-predicting transformer over the N_z latent vectors.

    Its output layer maps width -> d_z, so with width < d_z every clean-latent prediction lies
    in a width-dimensional subspace of each latent vector's d_z; along the other directions
    the probability-flow ODE contracts the noise to 0 at t = 0 and the samples have no
    variance there. The presets keep width >= d_z."""

    depth: Annotated[int, Range(ge=1)] = 12
    width: Annotated[int, Range(ge=1), DivisibleBy("heads")] = 768
    heads: Annotated[int, Range(ge=1)] = 12
    mlp_ratio: Annotated[float, Range(gt=0)] = 4.0


# --------------------------------------------------------------------------- method sections


@dataclass(frozen=True)
class Section:
    """A config section owned by a method: its dataclass and its value at each preset
    (`presets(name)` gets the full preset name, e.g. "tiny-4x"; None = the class defaults)."""

    cls: type
    presets: typing.Callable[[str], Any] | None = None

    def default(self, preset: str) -> Any:
        return self.presets(preset) if self.presets else self.cls()


SECTIONS: dict[str, Section] = {}
# A stage's changes to a preset when that stage is trained (stage kind -> fn(cfg, preset)).
STAGE_PRESET_CHANGES: dict[str, typing.Callable[[Config, str], None]] = {}
# Keys that older versions wrote into config.json and that no longer exist: ignored on load.
REMOVED_KEYS = frozenset({"sample.use_ema"})
CORE_SECTIONS = ("model", "data", "train", "sample", "prior")


def register_section(name: str, presets: typing.Callable[[str], Any] | None = None):
    """Class decorator: the dataclass becomes config section `name` of every Config built
    afterwards (`cfg.NAME`, keys `NAME.field`), with `presets(preset)` giving its value at a
    preset."""

    def wrap(cls):
        if name in CORE_SECTIONS or name == "preset":
            raise ValueError(f"config section {name!r} is a core section")
        SECTIONS[name] = Section(cls, presets)
        return cls

    return wrap


@dataclass
class Config:
    """The core sections as fields; the registered method sections in `sections`, read and
    written as attributes (cfg.autoencoder) and saved at the top level of config.json."""

    preset: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    sections: dict[str, Any] = field(
        default_factory=lambda: {n: s.cls() for n, s in SECTIONS.items()}, repr=False
    )

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"config has no section {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SECTIONS and "sections" in self.__dict__:
            self.sections[name] = value
        else:
            super().__setattr__(name, value)

    def section_names(self) -> list[str]:
        return [*CORE_SECTIONS, *self.sections]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"preset": self.preset}
        for name in self.section_names():
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        unknown = [k for k, v in d.items() if isinstance(v, dict) and k not in SECTIONS]
        unknown = [k for k in unknown if k not in CORE_SECTIONS]
        if unknown:
            raise ConfigError(
                f"config section(s) {unknown} belong to no registered method (is the plugin "
                "that defines it imported? see DILADIFF_PLUGINS in the README)"
            )
        cfg = cls()
        for key, value in _flatten(d):
            if key not in REMOVED_KEYS:
                set_value(cfg, key, value)
        return validate(cfg)

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
    return cfg


def _cpu() -> Config:
    """Models that learn language on 2 CPU cores within the hour (the real-text evidence): a
    4,096-token BPE trained on the corpus (the 30,522-word BERT vocabulary spends most of a
    small model on its embedding and head), L = 64, a 4 x 256 decoder."""
    cfg = Config(preset="cpu")
    cfg.model = ModelConfig(depth=4, width=256, heads=4, positions="rope")
    cfg.data = DataConfig(source="wiki-vital", tokenizer="bpe-4096", seq_len=64, heldout_docs=300)
    cfg.train = TrainConfig(
        batch_size=64,
        lr=1e-3,
        warmup_steps=100,
        total_steps=4000,
        ema=0.999,
        log_every=25,
        eval_every=500,
        ckpt_every=250,
        eval_batches=16,
    )
    cfg.sample = SampleConfig(num_samples=256, batch_size=64)
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": _tiny,
    "cpu": _cpu,
    "small": _small,
    "paper": _paper,
}
# Preset name suffixes (e.g. "tiny-4x"): handled by the sections' own preset functions.
PRESET_SUFFIXES = ("-4x",)


def preset_base(preset: str) -> str:
    for suffix in PRESET_SUFFIXES:
        preset = preset.removesuffix(suffix)
    return preset


def build_config(
    preset: str = "paper", overrides: typing.Sequence[str] = (), stage: str = "mdlm"
) -> Config:
    """The named preset with every method section at that preset, adjusted for training
    `stage` (its registered preset changes), then `key=value` overrides applied in order.

    A "-4x" suffix (e.g. "tiny-4x") halves d_z: 4x compression instead of 2x."""
    base = preset_base(preset)
    if base not in PRESETS:
        raise ConfigError(
            f"unknown preset {preset!r}; choose one of {sorted(PRESETS)} (optionally with -4x)"
        )
    cfg = PRESETS[base]()
    for name, section in SECTIONS.items():
        setattr(cfg, name, section.default(preset))
    if stage in STAGE_PRESET_CHANGES:
        STAGE_PRESET_CHANGES[stage](cfg, base)
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


def _fields(obj: Any) -> list[str]:
    """The keys one level down: a Config's sections, a section's fields."""
    if isinstance(obj, Config):
        return ["preset", *obj.section_names()]
    return [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of a config (leaf fields only)."""
    obj = Config() if obj is None else obj
    keys = []
    for name in _fields(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """`key=value` overrides applied in order, then the whole configuration checked
    (`validate`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip(), raw.strip(), from_string=True)
    return validate(cfg)


def set_value(cfg: Any, key: str, value: Any, from_string: bool = False) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        if part not in _fields(obj):
            close = difflib.get_close_matches(key, all_keys(cfg), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"config key {key!r} is a section, not a value")
            hint = str if part == "preset" else typing.get_type_hints(type(obj))[part]
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


# --------------------------------------------------------------------------- validation


@functools.cache
def field_annotations(cls: type) -> dict[str, tuple[Any, tuple]]:
    """Field name -> (type, its Annotated metadata: rules, Help) of a config dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for f in dataclasses.fields(cls):
        hint, metadata = hints[f.name], ()
        if typing.get_origin(hint) is Annotated:
            hint, metadata = typing.get_args(hint)[0], hint.__metadata__
        out[f.name] = (hint, metadata)
    return out


@functools.cache
def field_rules(cls: type) -> dict[str, tuple[Any, tuple[Rule, ...]]]:
    """Field name -> (type, declared rules) of a config dataclass."""
    return {
        name: (hint, tuple(m for m in metadata if isinstance(m, Rule)))
        for name, (hint, metadata) in field_annotations(cls).items()
    }


def _lookup(cfg: Config, key: str) -> tuple[Any, Any, tuple[Rule, ...]]:
    """(value, type, rules) of a dotted leaf key."""
    *path, name = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    hint, rules = field_rules(type(obj))[name]
    return getattr(obj, name), hint, rules


def effective_value(cfg: Config, key: str) -> Any:
    """A key's value as relations see it: an unset value declared `same_as` another key (e.g.
    autoencoder.perceiver_width = 0, the latent width) is that key's value; any other unset
    value (0 = all) is None, which no relation compares with."""
    value, _, rules = _lookup(cfg, key)
    for rule in rules:
        if isinstance(rule, Range) and rule.unset is not None and value == rule.unset:
            return effective_value(cfg, _sibling(rule.same_as, key)) if rule.same_as else None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(key: str, value: Any, hint: Any) -> str | None:
    """What is wrong with a value's type, or with an int or float whatever its rules."""
    if hint is bool and not isinstance(value, bool):
        return f"{key} must be true or false, got {value!r}"
    if hint is int:
        if not _is_int(value):
            return f"{key} must be an integer, got {value!r}"
        if not -(2**63) <= value < 2**63:
            return f"{key}={value} does not fit in a 64-bit integer"
    if hint is float:
        if not (_is_int(value) or isinstance(value, float)):
            return f"{key} must be a number, got {value!r}"
        if not math.isfinite(value):
            return f"{key} must be a finite number, got {value!r}"
    if hint is str and not isinstance(value, str):
        return f"{key} must be a string, got {value!r}"
    return None


def problems(cfg: Config) -> list[str]:
    """Every declared rule a configuration breaks, in words (one per key), in key order."""
    found = []
    if preset_base(cfg.preset) not in PRESETS:
        found.append(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    for key in all_keys(cfg):
        if key == "preset":
            continue
        value, hint, rules = _lookup(cfg, key)
        problem = _type_problem(key, value, hint)
        for rule in () if problem or value is None else rules:
            problem = rule.problem(value, key, cfg)
            if problem:
                break
        if problem:
            found.append(problem)
    return found


def validate(cfg: Config) -> Config:
    """The configuration, or a ConfigError (one line) naming every declared rule it breaks:
    called wherever a configuration is resolved, before anything is written."""
    found = problems(cfg)
    if found:
        more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
        raise ConfigError("; ".join(found[:3]) + more)
    return cfg


def describe_key(key: str) -> str:
    """What a key takes, in words (its type and own declared rules; no unset value)."""
    hint, rules = field_rules(type(_lookup_section(key)))[key.rsplit(".", 1)[1]]
    words = [r.describe(hint is int, False) for r in rules if isinstance(r, Range)]
    words += [r.describe() for r in rules if isinstance(r, OneOf)]
    default = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return " and ".join(words) or default.get(hint, str(hint))


def _lookup_section(key: str) -> Any:
    """The section object that holds a dotted key, in a default Config."""
    obj = Config()
    for part in key.split(".")[:-1]:
        obj = getattr(obj, part)
    return obj


def parse_option(key: str, text: str, unset: bool = False) -> Any:
    """A command-line option's value for config key `key` (e.g. --disc-steps for
    sample.disc_steps): parsed to the key's type and checked by its own declared rules; the
    key's unset value (0 = default) only with `unset` (otherwise leaving the option out gives
    the default). ConfigError says what the key takes."""
    section = _lookup_section(key)
    hint, rules = field_rules(type(section))[key.rsplit(".", 1)[1]]
    try:
        value = _coerce(key, text, hint, from_string=True)
    except ConfigError:
        value = None
    check = Config() if unset else None  # with no config, a Range refuses its unset value
    ok = value is not None and _type_problem(key, value, hint) is None
    if ok and all(not r.own or r.problem(value, key, check) is None for r in rules):
        return value
    unset_values = [r.unset for r in rules if isinstance(r, Range) and r.unset is not None]
    leave = " (leave the option out for the configured value)" if value in unset_values else ""
    raise ConfigError(f"{key} must be {describe_key(key)}, got {text!r}{leave}")


def overrides_from_file(path: str | Path) -> tuple[str | None, list[str]]:
    """(preset or None, key=value overrides) from a JSON or TOML file (by suffix) of nested
    sections ({"train": {"lr": 2e-4}}) or dotted keys ({"train.lr": 2e-4}). The keys are
    checked when the overrides are applied; the file's "preset" is returned on its own."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSON/TOML errors are ValueErrors
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a table of keys, not a {type(data).__name__}"
        )
    preset, overrides = None, []
    for key, value in _flatten(data):
        if key == "preset":
            preset = str(value)
        elif key in REMOVED_KEYS:  # an older run's config.json
            continue
        elif isinstance(value, bool | int | float | str):
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, bool) else value}")
        else:
            raise ConfigError(f"config file {path}: {key} has a {type(value).__name__} value")
    return preset, overrides


def _flatten(d: dict[str, Any], prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v
