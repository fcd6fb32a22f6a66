"""What the parallel-decoding check trains and samples: the chain it is about, the methods
trained beside it (any registered generator: `--methods duo,co-ladd`), the N_disc grid and
the decoding settings (CheckPlan).

The chain is SUBJECT and its ancestors as the stages declare them (`parents`); each stage
trains for its own `check_steps` (stages/base.py) unless the plan's `steps` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from diladiff.config import ConfigError, SampleConfig
from diladiff.stages import STAGES, stage_order

# The stage the check is about; it trains with its ancestors, which make up the chain.
SUBJECT = "diladiff"


@dataclass(frozen=True)
class Chain:
    """The check's stages by role, parents first: the MDLM, the auto-encoder initialised from
    it, the latent prior on the auto-encoder's latents and that prior's distillation."""

    mdlm: str
    autoencoder: str
    prior: str
    distilled: str

    @classmethod
    def of(cls, subject: str) -> Chain:
        """The chain ending in `subject`, from its stage's ancestry (stage_order)."""
        return cls(*stage_order([subject]))

    def kinds(self) -> tuple[str, ...]:
        """The chain's stage kinds, parents first."""
        return (self.mdlm, self.autoencoder, self.prior, self.distilled)


CHAIN = Chain.of(SUBJECT)

# Per-stage settings of the check: the auto-encoder at the paper's single learning rate for
# encoder and decoder (the tiny preset slows the pretrained decoder by 10x).
CHECK_STAGE_OVERRIDES = {CHAIN.autoencoder: ["autoencoder.decoder_lr_scale=1.0"]}


def method_choices() -> list[str]:
    """The registered stages the check can train beside its chain: every generator (a
    non-empty `eval_samplers`) that is not part of the chain, in registration order."""
    chain = CHAIN.kinds()
    return [k for k in stage_order(optional=True) if k not in chain and STAGES[k].eval_samplers]


def check_methods(methods: tuple[str, ...]) -> None:
    """A one-line ConfigError unless every name is in `method_choices()`."""
    choices = method_choices()
    bad = [m for m in methods if m not in choices]
    if bad:
        raise ConfigError(
            f"--methods: {', '.join(map(repr, bad))} is not a method the check can add; "
            f"choose from {', '.join(choices)} (the chain {', '.join(CHAIN.kinds())} is "
            "always trained)"
        )


def parse_methods(spec: str) -> tuple[str, ...]:
    """`duo, co-ladd` -> ("duo", "co-ladd"), each checked against the registry."""
    methods = tuple(dict.fromkeys(m.strip() for m in spec.split(",") if m.strip()))
    check_methods(methods)
    return methods


def parse_steps(spec: str) -> dict[str, int]:
    """`mdlm=1500,autoencoder=800` -> {"mdlm": 1500, "autoencoder": 800} (the stage names are
    checked by CheckPlan, which knows which stages it trains)."""
    steps = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        stage, _, n = item.partition("=")
        if not n.isdigit():
            raise ConfigError(f"--steps: expected STAGE=N, got {item!r}")
        steps[stage.strip()] = int(n)
    return steps


def disc_grid(seq_len: int) -> list[int]:
    """N_disc in {1, 2, 4, L/8, L/4, L/2, L} (sorted, unique, >= 1)."""
    return sorted({n for n in (1, 2, 4, seq_len // 8, seq_len // 4, seq_len // 2, seq_len) if n})


@dataclass
class CheckPlan:
    """What the check trains and samples: N rows per generator at each N_disc."""

    num_samples: int = 512
    batch_size: int = 256
    seed: int = 0
    gamma: float = 0.2  # the distilled prior's gamma-sampling (the paper's best is about 0.1-0.3)
    prior_cont_steps: tuple[int, ...] = (200, 5)
    distilled_cont_steps: int = 5
    # Training steps per stage kind, replacing the stage's own `check_steps`.
    steps: dict[str, int] = field(default_factory=dict)
    strategy: str = "ancestral"  # how every generator's decoder reveals tokens (or "topk")
    temperature: float = 1.0  # of every generator's token draws
    # Registered stages trained on the rows beside the chain, each sampled with every one of
    # its `eval_samplers` at every N_disc (method_choices()).
    methods: tuple[str, ...] = ()
    # Per method, samplers replacing its stage's `eval_samplers` (e.g. an N_cont sweep).
    samplers: dict[str, tuple[dict, ...]] = field(default_factory=dict)

    def __post_init__(self):
        """A one-line ConfigError for a method the check cannot train."""
        self.methods = tuple(self.methods)
        check_methods(self.methods)

    def check_steps(self) -> None:
        """A one-line ConfigError for a `steps` stage the check does not train (run_check calls
        it, once the methods are final)."""
        unknown = [k for k in self.steps if k not in self.kinds()]
        if unknown:
            raise ConfigError(
                f"--steps: the check trains no stage {', '.join(map(repr, unknown))}; "
                f"it trains {', '.join(self.kinds())}"
            )

    def kinds(self) -> list[str]:
        """Every stage the check trains, parents first: the chain, then the methods (and any
        ancestors they declare)."""
        return stage_order([SUBJECT, *self.methods])

    def method_samplers(self, kind: str) -> tuple[dict, ...]:
        """The samplers a method is drawn with: the plan's for it, else its stage's own."""
        return self.samplers.get(kind, STAGES[kind].eval_samplers)

    def stage_steps(self) -> dict[str, int]:
        """Each trained stage's step count: the plan's `steps`, else its `check_steps`."""
        return {k: self.steps.get(k, STAGES[k].check_steps) for k in self.kinds()}

    def stage_overrides(self) -> dict[str, list[str]]:
        """Each stage's step count (its whole schedule) and the check's per-stage settings."""
        return {
            stage: [f"train.max_steps={n}", f"train.total_steps={n}"]
            + CHECK_STAGE_OVERRIDES.get(stage, [])
            for stage, n in self.stage_steps().items()
        }

    def sample_config(self, base: SampleConfig, sampler: dict, n_disc: int) -> SampleConfig:
        """A run's sample.* with the plan's token draws (its strategy and temperature, top-p 1,
        gamma 0), then a sampler's own settings (e.g. {"strategy": "greedy_tail"},
        {"inference": "joint"}, {"cont_steps": 32}), at N_disc = n_disc."""
        plan = {"strategy": self.strategy, "temperature": self.temperature, "top_p": 1.0}
        return replace(base, **{"gamma": 0.0, **plan, **sampler, "disc_steps": n_disc})

    @property
    def sampler(self) -> str:
        """The token draws in words, for the results."""
        return f"{self.strategy}, temperature {self.temperature:g}, top-p 1"

    @property
    def results_name(self) -> str:
        """check.* for the default decoding; check_topk_t0.5.* etc. beside it otherwise, so
        several decodings of the same trained stages can be compared."""
        if (self.strategy, self.temperature) == ("ancestral", 1.0):
            return "check"
        return f"check_{self.strategy}_t{self.temperature:g}"
