"""Speed benchmarks.

Sampling: wall time per batch, tokens/s and network calls, measured in one process after a
warm-up batch, with device synchronisation around every timed batch; and the token samplers
(fast vs reference) side by side in one process.

Training (`bench_training`): seconds per optimizer step, tokens/s and model FLOPs utilisation
(MFU) of a freshly built stage, against the matmul peak measured in the same process. FLOPs are
counted by torch's FlopCounterMode (matmuls, convolutions and attention, 2 FLOPs per multiply-add;
elementwise work is not counted), forward and backward as executed, split between the modules
that train and the frozen ones (feature models, teachers, frozen auto-encoders).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diladiff.config import ConfigError
from diladiff.runtime import autocast, synchronize
from diladiff.sampling.generate import sample_batch


@torch.no_grad()
def bench_sampling(
    stage,
    settings,  # sampling.generate.GenerationSettings
    batch_sizes=(1, 8, 32),
    repeats: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[dict]:
    """One row per batch size: medians over `repeats` timed batches after one warm-up batch.
    Latent stages add latent_s, decode_s and latent_overhead = latent_s / decode_s."""
    device = torch.device(device)
    rows = []
    for batch in tqdm(batch_sizes, desc="bench", unit="batch size", leave=False):
        gen = torch.Generator(device).manual_seed(seed)
        with autocast(device):
            sample_batch(stage, batch, settings, gen, device)  # warm-up (allocations, kernels)
            runs = [_timed_sample(stage, batch, settings, gen, device)[1] for _ in range(repeats)]
        rows.append(_row(stage, batch, runs))
    return rows


@torch.no_grad()
def compare_samplers(
    stage,
    settings,
    batch_sizes=(1, 8, 32),
    repeats: int = 3,
    device: torch.device | str = "cpu",
    seed: int = 0,
    samplers: tuple[str, ...] = ("reference", "fast"),
) -> list[dict]:
    """The token samplers side by side in one process: one row per (batch size, sampler).

    Each sampler gets a warm-up batch, then the timed batches alternate between the samplers,
    so that other load on shared cores falls on both alike. Every sampler's generator starts
    from `seed`, and the samplers consume it identically, so batch k of each should hold the
    same tokens: `same_tokens` is the share equal to the first sampler's (1.0 in float64; float32
    rounding of a head computed on fewer rows may, rarely, flip a near-tie).
    `speedup` = the first sampler's median wall time / this sampler's."""
    device = torch.device(device)
    rows = []
    for batch in tqdm(batch_sizes, desc="bench", unit="batch size", leave=False):
        variants = {
            name: dataclasses.replace(
                settings, tokens=dataclasses.replace(settings.tokens, sampler=name)
            )
            for name in samplers
        }
        gens = {name: torch.Generator(device).manual_seed(seed) for name in samplers}
        runs = {name: [] for name in samplers}
        ids = {name: [] for name in samplers}
        with autocast(device):
            for name in samplers:  # warm-up (allocations, kernels)
                sample_batch(stage, batch, variants[name], gens[name], device)
            for _ in range(repeats):
                for name in samplers:
                    out, run = _timed_sample(stage, batch, variants[name], gens[name], device)
                    runs[name].append(run)
                    ids[name].append(out)
        base = _row(stage, batch, runs[samplers[0]])
        for name in samplers:
            row = {"sampler": name, **_row(stage, batch, runs[name])}
            row["speedup"] = base["wall_s_per_batch"] / row["wall_s_per_batch"]
            same = torch.cat(ids[samplers[0]]) == torch.cat(ids[name])
            row["same_tokens"] = same.float().mean().item()
            rows.append(row)
    return rows


def _timed_sample(stage, batch, settings, gen, device) -> tuple[torch.Tensor, dict]:
    """One synchronised, timed sample_batch call: (ids, {"wall": seconds, **stats})."""
    synchronize(device)
    t0 = time.perf_counter()
    ids, stats = sample_batch(stage, batch, settings, gen, device)
    synchronize(device)
    return ids, {"wall": time.perf_counter() - t0, **stats}


def _row(stage, batch: int, runs: list[dict]) -> dict:
    """Medians of timed runs as a table row (tokens/s from the median wall time)."""
    med = {k: statistics.median([r[k] for r in runs]) for k in runs[0]}
    wall = med.pop("wall")
    row = {
        "batch": batch,
        "wall_s_per_batch": wall,
        "tokens_per_s": batch * stage.seq_len / wall,
        "repeats": len(runs),
        **med,
    }
    if "latent_s" in row:
        row["latent_overhead"] = row["latent_s"] / row["decode_s"]
    return row


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dict rows."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- training speed


def matmul_flops(n: int) -> int:
    """2 n^3: the FLOPs of an (n x n) @ (n x n) matmul (a multiply and an add per term)."""
    return 2 * n**3


def matmul_peak(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    min_seconds: float = 0.5,
) -> float:
    """The machine's measured matmul peak in FLOP/s: the fastest of repeated timed (n x n) @
    (n x n) products, 2 n^3 / t each, after one untimed product; timed for at least
    `min_seconds`. n defaults to 2048 on the CPU and 8192 on CUDA (smaller products do not fill a
    GPU). The fastest, not the median: on shared cores the peak is what the cores give alone."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up (allocations, library initialisation)
    repeats = 8 if device.type == "cuda" else 1  # a GPU product is too short to time alone
    best, spent = 0.0, 0.0
    while spent < min_seconds:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        synchronize(device)
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, repeats * matmul_flops(n) / dt)
    return best


def model_flops_utilisation(flops_per_step: float, seconds_per_step: float, peak: float) -> float:
    """MFU = (FLOPs per step / seconds per step) / peak FLOP/s."""
    return flops_per_step / seconds_per_step / peak


def _cpu_attention_flop_formulas() -> dict:
    """FlopCounterMode formulas for the CPU's fused attention kernels, which torch's registry
    leaves out (the CUDA kernels are in it): without them attention costs nothing on the CPU.
    The same counts as the registered kernels: 4 b h s_q s_k d forward (scores and weighted
    sum) and 2.5 times that backward (five products: a fused backward recomputes the scores)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    formulas = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", forward),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", backward),
    ):
        if hasattr(aten, name):
            formulas[getattr(aten, name)] = formula
    return formulas


def held_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of `module`, with those of modules it (or a submodule) holds as plain
    attributes, unregistered: a frozen feature encoder kept out of state_dict and optimizers."""
    found: dict[int, nn.Parameter] = {}
    for m in module.modules():
        held = [v for v in vars(m).values() if isinstance(v, nn.Module)]
        for p in [*m.parameters(recurse=False), *(q for h in held for q in h.parameters())]:
            found.setdefault(id(p), p)
    return list(found.values())


def frozen_modules(root: nn.Module) -> list[str]:
    """The outermost submodules of `root` that hold parameters (held_parameters), none of them
    trainable: a frozen feature model, teacher or auto-encoder; by name in `root`."""

    def frozen(module: nn.Module) -> bool:
        params = held_parameters(module)
        return bool(params) and not any(p.requires_grad for p in params)

    found: list[str] = []
    for name, module in root.named_modules():
        if name and frozen(module) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    return found


def count_flops(fn: Callable[[], object], root: nn.Module, depth: int = 2) -> dict:
    """Run fn() (which calls `root`) under torch's FlopCounterMode and return its FLOPs:
    total; frozen = those spent inside frozen_modules(root), forward and any backward through
    them; trainable = total - frozen; by_module = the FLOPs of each submodule of `root` down to
    `depth` levels (names relative to `root`; a module's FLOPs include its submodules').

    by_module is exact for forward passes only: in a backward, torch's module tracker leaves a
    module "open" until gradients reach its inputs, so one whose inputs need no gradient (fed
    by a frozen embedding or encoder) is charged with the rest of the backward too. The total
    is exact; the frozen share too, since a frozen module's outputs need a gradient (and it
    joins a backward) only when its inputs do, and then it is closed on reaching them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flop_formulas())
    with counter:
        fn()
    # The counter names `root` by its class and every submodule by its path below it.
    prefix = type(root).__name__
    per_module = {}
    for name, ops in counter.get_flop_counts().items():
        if name == prefix or name.startswith(prefix + "."):
            per_module[name[len(prefix) + 1 :]] = sum(ops.values())
    total = counter.get_total_flops()
    # A frozen module's own forward need not run (a stage may call its methods, e.g. ae.encode,
    # and those call its submodules): the frozen FLOPs are those of the outermost modules that
    # ran inside a frozen module (each module's count includes the modules it called).
    frozen_names = frozen_modules(root)

    def inside_frozen(name: str) -> bool:
        return any(name == f or name.startswith(f + ".") for f in frozen_names)

    ran = [name for name in per_module if name and inside_frozen(name)]
    outermost = [n for n in ran if not any(n.startswith(a + ".") for a in ran)]
    frozen = sum(per_module[name] for name in outermost)
    by_module = {k: v for k, v in per_module.items() if k and k.count(".") < depth}
    return {"total": total, "frozen": frozen, "trainable": total - frozen, "by_module": by_module}


def _forward_only(trainer) -> None:
    """The forward passes of the trainer's next optimizer step, without backward or update:
    the same micro-batches, generator seeds (so the same random passes) and autocast."""
    from diladiff.train.trainer import autocast_for, step_seed

    tc, env = trainer.cfg.train, trainer.env
    trainer.model.on_step(trainer.step)
    for m in range(trainer.accum):
        batch = trainer.rows.micro_batch(
            trainer.step, tc.batch_size, trainer.micro, m, env.rank, env.world
        ).to(env.device)
        gen = torch.Generator(env.device).manual_seed(step_seed(tc.seed, trainer.step, m, env.rank))
        with autocast_for(trainer.cfg, env.device):
            trainer.forward(batch, gen)


def untrained_statistics(stage: nn.Module) -> int:
    """Give every standardiser of `stage` that has seen no data the identity statistics (mean 0,
    variance 1), so that a stage built without its parent runs can run: a fresh parent's frozen
    standardisers (a LaDiff's auto-encoder, a DiLaDiff's prior space) would otherwise refuse to
    standardise. Standardising costs the same whatever the statistics; a standardiser that
    training or prepare() fits is fitted as usual. Returns how many were set."""
    from diladiff.nets.standardize import RunningStandardizer, Standardizer

    n = 0
    for m in stage.modules():
        if isinstance(m, RunningStandardizer) and m.count == 0:
            m.count.fill_(1)  # one observation of variance m2 / count = 1
            m.mean.zero_()
            m.m2.fill_(1)
            n += 1
        elif isinstance(m, Standardizer) and not m.fitted:
            m.mean.zero_()
            m.std.fill_(1)
            m.fitted.fill_(True)
            n += 1
    return n


def training_config(kind: str, preset: str | None, overrides: list[str], parents: dict):
    """The config and checked parent runs of a new `kind` run, resolved as `diladiff train`
    resolves them: preset, the sections inherited from the parent run, overrides. Without
    parent runs the inherited sections are those a chain trained at the same preset would pass
    down (fresh_chain_config)."""
    from diladiff.config import apply_overrides
    from diladiff.runs import resolve_config

    if parents:  # resolve_config checks the parents and copies their sections
        with tempfile.TemporaryDirectory() as tmp:
            cfg, _, parents = resolve_config(kind, Path(tmp) / "run", preset, overrides, parents)
        return cfg, parents
    return apply_overrides(fresh_chain_config(kind, preset or "paper"), overrides), {}


def fresh_chain_config(kind: str, preset: str):
    """The config of `kind` at `preset` with the sections it inherits (`inherits`) taken from
    its parent's config at the same preset, recursively: what a chain of runs trained with
    `--preset preset` hands down (a DiLaDiff gets its LaDiff parent's prior size)."""
    from diladiff.config import build_config
    from diladiff.stages import STAGES

    cfg = build_config(preset, [], stage=kind)
    cls = STAGES[kind]
    if cls.inherits and len(cls.parents) == 1:
        parent = fresh_chain_config(next(iter(cls.parents.values())), preset)
        for section in cls.inherits:
            setattr(cfg, section, getattr(parent, section))
    return cfg


def bench_training(
    kind: str,
    preset: str | None = None,
    overrides: list[str] | None = None,
    parents: dict | None = None,
    steps: int = 10,
    warmup_steps: int = 2,
    flop_steps: int = 1,
    device: str | None = None,
    progress: bool | None = None,
    peak_seconds: float = 0.5,
) -> dict:
    """Training speed of the stage `kind`, built as `diladiff train` builds a new run: the same
    config resolution, data (real packed rows of data.source), parents (loaded from `parents`,
    role -> run folder; without them every stage is freshly random: parent weights do not
    change the cost), prepare(), trainer and optimizer step (autocast, accumulation, clipping,
    EMA). `flop_steps` untimed steps are counted by FlopCounterMode (on the uncompiled model),
    then `warmup_steps` untimed and `steps` timed steps run, each between device
    synchronisations. Returns one flat dict (per optimizer step unless named otherwise)."""
    from diladiff.data.packing import prepare_data
    from diladiff.data.tokenizer import load_tokenizer, tokenizer_identity
    from diladiff.runs import load_run
    from diladiff.runtime import resolve_precision
    from diladiff.stages import STAGES
    from diladiff.train.distributed import DistEnv, pick_device
    from diladiff.train.trainer import Trainer

    if kind not in STAGES:
        raise ConfigError(f"unknown stage {kind!r}; choose one of {sorted(STAGES)}")
    cfg, parents = training_config(kind, preset, list(overrides or []), dict(parents or {}))
    cfg.train.logger = "none"  # the trainer writes nothing: no run folder is kept
    env = DistEnv(device=pick_device(device or cfg.train.device))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    progress = cfg.train.progress if progress is None else progress
    tok = load_tokenizer(cfg.data)  # data.tokenizer resolved (a corpus BPE found or trained)
    data = prepare_data(cfg.data, tok, progress=progress)
    torch.manual_seed(cfg.train.seed)
    stage = STAGES[kind](cfg, tokenizer_identity(tok))
    if parents:
        stage.init_from_parents({role: load_run(run)[0] for role, run in parents.items()})
    elif type(stage).parents:
        untrained_statistics(stage)
    stage.prepare(data, env.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, stage, data, Path(tmp), env)
        trainer.model.train()
        compiled, trainer.forward = trainer.forward, trainer.ddp  # count the plain module
        fwd, full = [], []
        for _ in range(flop_steps):
            fwd.append(count_flops(lambda: _forward_only(trainer), trainer.model))
            full.append(count_flops(trainer.train_step, trainer.model))
        trainer.forward = compiled
        for _ in range(warmup_steps):
            trainer.train_step()
        times = []
        for _ in tqdm(range(steps), desc=f"bench train {kind}", disable=not progress):
            synchronize(env.device)
            t0 = time.perf_counter()
            trainer.train_step()
            synchronize(env.device)
            times.append(time.perf_counter() - t0)
    precision = resolve_precision(env.device, cfg.train.precision)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    measured = {"fp32"} | ({"bf16"} if env.device.type == "cuda" else set()) | {precision}
    peaks = {p: matmul_peak(env.device, dtypes[p], min_seconds=peak_seconds) for p in measured}
    s_per_step = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.data.seq_len

    def mean(counts: list[dict], key: str) -> float:
        return sum(c[key] for c in counts) / len(counts)

    flops = mean(full, "total")
    params = held_parameters(stage)
    return {
        "stage": kind,
        "preset": cfg.preset,
        "device": str(env.device),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "batches": "real packed rows of data.source",
        "batch_size": cfg.train.batch_size,
        "micro_batch_size": trainer.micro,
        "accumulation": trainer.accum,
        "seq_len": cfg.data.seq_len,
        "tokens_per_step": tokens,
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "frozen_params": sum(p.numel() for p in params if not p.requires_grad),
        "flop_steps": flop_steps,
        "warmup_steps": warmup_steps,
        "steps": steps,
        "s_per_step": s_per_step,
        "s_per_step_min": min(times),
        "s_per_step_max": max(times),
        "tokens_per_s": tokens / s_per_step,
        "flops_per_step": flops,
        "forward_flops_per_step": mean(fwd, "total"),
        "trainable_flops_per_step": mean(full, "trainable"),
        "frozen_flops_per_step": mean(full, "frozen"),
        "achieved_flops_per_s": flops / s_per_step,
        "peak_flops_per_s": peaks,
        "mfu": model_flops_utilisation(flops, s_per_step, peaks[precision]),
        "forward_flops_by_module": _mean_by_module(fwd),
    }


def _mean_by_module(counts: list[dict]) -> dict[str, float]:
    """The mean over counted steps of each module's FLOPs (0 in a step it did not run in)."""
    names = sorted({k for c in counts for k in c["by_module"]})
    return {k: sum(c["by_module"].get(k, 0) for c in counts) / len(counts) for k in names}
