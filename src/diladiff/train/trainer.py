"""The generic training loop over any stage's loss.

AdamW, warm-up + cosine (per-group warm-ups), gradient accumulation and clipping, EMA, bf16
autocast on CUDA, DDP or FSDP2 (train.parallel; train/sharding.py) through torchrun, periodic
evaluation on EMA weights, atomic checkpoints and exact resume. Every random draw of step k
comes from a generator seeded by (seed, k, micro-batch, rank), and the data position is a
function of k, so a resumed run continues bit-for-bit where an uninterrupted one would be.
SIGTERM (a scheduler's pre-emption) finishes the current step, saves a checkpoint and raises
errors.Terminated, every rank at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from diladiff.config import PARALLEL, Config, ConfigError
from diladiff.data.batches import RowSampler, validation_batches
from diladiff.data.packing import PackedData
from diladiff.errors import Terminated, TrainingError
from diladiff.runtime import PRECISIONS, autocast, resolve_precision
from diladiff.train import checkpoint as ckpt
from diladiff.train import sharding
from diladiff.train.curve import write_training_curve
from diladiff.train.distributed import DistEnv, all_mean, barrier, replica_digests
from diladiff.train.ema import EMA, ema_weights
from diladiff.train.schedule import lr_factor


def step_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (seed, step, micro-batch, rank)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def autocast_for(cfg: Config, device: torch.device):
    precision = cfg.train.precision
    if precision not in PRECISIONS:
        raise TrainingError(f"train.precision must be auto, fp32 or bf16, not {precision!r}")
    return autocast(device, precision)


def batch_layout(batch_size: int, micro: int, world: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) for a global batch."""
    if batch_size % world:
        raise TrainingError(f"train.batch_size={batch_size} is not divisible by {world} processes")
    micro = micro or batch_size // world
    if (batch_size // world) % micro:
        raise TrainingError(
            f"train.batch_size / processes = {batch_size // world} is not divisible by "
            f"train.micro_batch_size={micro}"
        )
    return micro, batch_size // world // micro


LOGGERS = ("none", "tensorboard")


def experiment_logger(name: str, run_dir: Path):
    """The optional experiment logger: None, or a TensorBoard SummaryWriter on
    run_dir/tensorboard (imported lazily; the `tensorboard` extra)."""
    if name not in LOGGERS:
        raise TrainingError(f"train.logger must be one of {LOGGERS}, not {name!r}")
    if name == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainingError(
            "train.logger=tensorboard needs the tensorboard package "
            "(pip install 'diladiff[tensorboard]')"
        ) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class SigtermFlag:
    """While active (a context manager), SIGTERM sets `requested` instead of killing the
    process, so the loop can save first. Only the main thread can install signal handlers;
    elsewhere (a training thread in a notebook) it does nothing."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when `flag` is true on any (so all ranks stop at the same step)."""
    if not env.enabled:
        return flag
    return bool(all_mean(torch.tensor(float(flag), device=env.device), env).item() > 0)


class Trainer:
    """Trains any stage: an nn.Module whose forward(batch, generator) returns (loss, metrics)
    and that offers evaluate, param_groups, on_step, summary and kind, optionally
    fsdp_per_block (stages/base.py; the trainer does not import the stages: train and stages
    are independent layers)."""

    def __init__(
        self, cfg: Config, stage: nn.Module, data: PackedData, run_dir: Path, env: DistEnv
    ):
        self.cfg, self.stage, self.data, self.run_dir, self.env = (
            cfg,
            stage,
            data,
            Path(run_dir),
            env,
        )
        tc = cfg.train
        if tc.parallel not in PARALLEL:
            raise ConfigError(f"train.parallel must be one of {PARALLEL}, not {tc.parallel!r}")
        # fsdp with one process trains the plain module (nothing to shard across).
        self.fsdp = tc.parallel == "fsdp" and env.enabled
        # Under fsdp the main rank evaluates a plain copy (kept on the CPU between evaluations).
        self._eval_model: nn.Module | None = (
            copy.deepcopy(stage).cpu() if self.fsdp and env.is_main else None
        )
        self.model = stage.to(env.device)
        if self.fsdp:
            per_block = getattr(stage, "fsdp_per_block", False)  # see stages/base.py
            sharding.shard(self.model, env.device, env.world, self.bf16(), per_block)
            self.ddp = self.model
        elif env.enabled:
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None
            )
        else:
            self.ddp = self.model
        self.forward = self.ddp
        if cfg.model.compile:
            self.forward = torch.compile(self.ddp)
        groups = stage.param_groups()
        for g in groups:
            g["base_lr"] = tc.lr * g.pop("lr_scale", 1.0)
            g.setdefault("warmup_steps", tc.warmup_steps)
        self.params = [p for g in groups for p in g["params"]]
        self.opt = torch.optim.AdamW(
            groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay
        )
        self.ema = EMA(self.model, tc.ema) if tc.ema > 0 else None
        self.micro, self.accum = batch_layout(tc.batch_size, tc.micro_batch_size, env.world)
        self.rows = RowSampler(data.train, tc.seed)
        self.val = validation_batches(data.val, self.micro, tc.eval_batches)
        self.step = 0
        self.writer = experiment_logger(tc.logger, self.run_dir) if env.is_main else None

    def bf16(self) -> bool:
        """Whether the forward runs in bf16 (train.precision bf16, or auto on CUDA)."""
        return resolve_precision(self.env.device, self.cfg.train.precision) == "bf16"

    # ------------------------------------------------------------------ state
    def resume(self) -> bool:
        """Load the newest checkpoint of the run folder, if there is one (any of ddp, fsdp and
        single-process runs wrote it: checkpoints hold full tensors in one layout)."""
        path = ckpt.latest_checkpoint(self.run_dir)
        if path is None:
            return False

        weights = ckpt.read_safetensors(path / "model.safetensors")
        state = ckpt.load_trainer_state(path)
        if self.fsdp:
            sharding.load_model_state(self.model, weights)
            sharding.load_optimizer_state(self.model, self.opt, state["optimizer"])
        else:
            self.model.load_state_dict(weights)
            self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None:
            ema = ckpt.read_safetensors(path / "ema.safetensors")
            if self.fsdp:  # the EMA of a sharded parameter is kept as the same shard
                ema = sharding.distribute_like(ema, self.ema.shadow)
            self.ema.load_state_dict(ema, state["ema_updates"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        return True

    def full_states(self) -> tuple[dict, dict, dict]:
        """(model, EMA, optimizer) state dicts with full tensors; under fsdp gathered to the
        main rank (a collective; empty dicts on the other ranks)."""
        if not self.fsdp:
            model = self.model.state_dict()
            return model, self.ema.state_dict() if self.ema else model, self.opt.state_dict()
        model = sharding.model_state(self.model)
        ema = sharding.full_tensors(self.ema.state_dict(), self.env.is_main) if self.ema else model
        return model, ema, sharding.optimizer_state(self.model, self.opt)

    def save(self) -> None:
        model_state, ema_state, opt_state = self.full_states()
        if self.env.is_main:
            state = {
                "step": self.step,
                "optimizer": opt_state,
                "ema_updates": self.ema.updates if self.ema else 0,
                "torch_rng": torch.get_rng_state(),
                "data_position": self.step * self.cfg.train.batch_size,
                "config": self.cfg.to_dict(),
            }
            ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model_state,
                ema_state,
                state,
                keep=self.cfg.train.keep_checkpoints,
            )
        barrier(self.env)

    def log(self, record: dict) -> None:
        if self.env.is_main:
            with open(self.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.writer is not None:
                prefix = "eval/" if record.get("event") == "eval" else "train/"
                for k, v in record.items():
                    if k not in ("step", "event") and isinstance(v, int | float):
                        self.writer.add_scalar(prefix + k, v, record["step"])
                self.writer.flush()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict:
        metrics: dict = {}
        full = None
        if self.fsdp:  # gathered by every rank, evaluated by the main one
            full = (
                sharding.full_tensors(self.ema.state_dict(), self.env.is_main)
                if self.ema is not None
                else sharding.model_state(self.model)
            )
        if self.env.is_main:
            if self._eval_model is None:
                self._eval_model = copy.deepcopy(self.model)
            self._eval_model.to(self.env.device)
            if self.step > 0:  # what on_step sets (a function of the step, as resume needs)
                self._eval_model.on_step(self.step - 1)
            if full is not None:
                own = self._eval_model.state_dict()
                self._eval_model.load_state_dict(ema_weights(own, full, own))
            elif self.ema is not None:
                self.ema.copy_to(self._eval_model)
            else:
                self._eval_model.load_state_dict(self.model.state_dict())
            self._eval_model.eval()
            gen = torch.Generator(self.env.device).manual_seed(self.cfg.train.seed + 12345)
            with autocast_for(self.cfg, self.env.device):
                metrics = self._eval_model.evaluate([b.to(self.env.device) for b in self.val], gen)
            self.log({"step": self.step, "event": "eval", **metrics})
            if self.fsdp:
                self._eval_model.cpu()
        barrier(self.env)
        return metrics

    # ------------------------------------------------------------------ training
    def train_step(self) -> tuple[float, float, dict]:
        tc, env = self.cfg.train, self.env
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(
                self.step, g["warmup_steps"], tc.total_steps, tc.schedule, tc.min_lr_ratio
            )
        self.opt.zero_grad(set_to_none=True)
        self.model.on_step(self.step)
        total = torch.zeros((), device=env.device)
        extra: dict = {}
        for m in range(self.accum):
            batch = self.rows.micro_batch(
                self.step, tc.batch_size, self.micro, m, env.rank, env.world
            ).to(env.device, non_blocking=True)
            gen = torch.Generator(env.device).manual_seed(
                step_seed(tc.seed, self.step, m, env.rank)
            )
            last = m == self.accum - 1
            if self.fsdp:  # gradients are reduce-scattered on the last micro-batch only
                self.model.set_requires_gradient_sync(last)
            sync = (
                contextlib.nullcontext()
                if last or not env.enabled or self.fsdp
                else self.ddp.no_sync()
            )
            with sync:
                with autocast_for(self.cfg, env.device):
                    loss, metrics = self.forward(batch, gen)
                (loss / self.accum).backward()
            total += loss.detach() / self.accum
            for k, v in metrics.items():
                if k != "loss":
                    extra[k] = extra.get(k, 0.0) + float(v) / self.accum
        loss_value = all_mean(total, env).item()
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"non-finite loss ({loss_value}) at step {self.step}; stopping without saving. "
                f"Last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'}"
            )
        clip = sharding.clip_grad_norm if self.fsdp else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(self.params, tc.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise TrainingError(
                f"non-finite gradient norm at step {self.step}; stopping without saving. "
                f"Last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'}"
            )
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return loss_value, float(grad_norm), extra

    def fit(self) -> dict:
        tc, env = self.cfg.train, self.env
        max_steps = tc.max_steps or tc.total_steps
        tokens_per_step = tc.batch_size * self.cfg.data.seq_len
        start_step, start = self.step, time.perf_counter()
        last_t, last_step = start, self.step
        bar = tqdm(
            total=max_steps,
            initial=self.step,
            desc=f"train {self.stage.kind}",
            disable=not (env.is_main and tc.progress),
            dynamic_ncols=True,
        )
        metrics: dict = {}
        stopped = "max_steps"
        self.model.train()
        with SigtermFlag() as sigterm:
            while self.step < max_steps:
                loss, grad_norm, extra = self.train_step()
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == max_steps:
                    now = time.perf_counter()
                    tps = tokens_per_step * (self.step - last_step) / max(now - last_t, 1e-9)
                    last_t, last_step = now, self.step
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
                    self.log(
                        {
                            "step": self.step,
                            "loss": loss,
                            "grad_norm": grad_norm,
                            "lr": self.opt.param_groups[0]["lr"],
                            "tokens_per_s": tps,
                            "elapsed_s": now - start,
                            **extra,
                        }
                    )
                if any_rank(sigterm.requested, env):
                    stopped = "sigterm"  # save now, skip the evaluation: the clock is running
                elif tc.time_limit_minutes > 0 and (
                    time.perf_counter() - start > 60 * tc.time_limit_minutes
                ):
                    stopped = "time_limit"
                last = self.step == max_steps
                if self.step % tc.eval_every == 0 or last or stopped == "time_limit":
                    metrics = self.evaluate()
                    if metrics and env.is_main:
                        bar.write(
                            f"step {self.step}: "
                            + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                        )
                if self.step % tc.ckpt_every == 0 or last or stopped != "max_steps":
                    self.save()
                if stopped != "max_steps":
                    break
        bar.close()
        digests = replica_digests(self.model, env)
        elapsed = time.perf_counter() - start
        self.log(
            {
                "step": self.step,
                "event": "end",
                "stopped": stopped,
                "replica_digests": digests,
                **(sharding.describe(self.model) if self.fsdp else {}),
                "steps_this_run": self.step - start_step,
                "elapsed_s": elapsed,
            }
        )
        if env.is_main:
            write_training_curve(self.run_dir)
            if self.writer is not None:
                self.writer.close()
        if stopped == "sigterm":
            raise Terminated(self.run_dir, self.step)
        return {"step": self.step, "stopped": stopped, **metrics}
