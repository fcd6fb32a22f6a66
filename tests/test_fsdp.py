"""train.parallel=fsdp (torch's FSDP2, train/sharding.py) against DDP, with 2 gloo processes.

Why the runs agree bit for bit rather than to a tolerance: the sharded forward and backward
compute on all-gathered copies of the same fp32 tensors, and both DDP and FSDP2 average the two
ranks' gradients as g0 / 2 + g1 / 2 (division by a power of two is exact, the sum of two
numbers does not depend on the order). The one reduction that differs is the gradient norm:
FSDP sums the shards' partial norms, and fp32 norms of ~1M entries are only good to ~1e-4 on
CPU (torch's reduction order), so the logged norms are compared to 1e-3 and the runs keep the
norm below train.grad_clip (no clipping), where it cannot reach the weights. The sharded clip
itself is checked against torch's on the full gradient in test_sharded_clip_matches_torch.
"""

import json
import shutil
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY, free_port, torchrun_cmd
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.train.checkpoint import load_trainer_state

STEPS = ["train.micro_batch_size=2", "train.ckpt_every=3"]  # 2 ranks x 2 micro-batches x 2 rows


def torchrun(run, parallel, max_steps, *extra, kind="mdlm"):
    cmd = torchrun_cmd(kind, run, *extra, f"train.max_steps={max_steps}")
    cmd.append(f"train.parallel={parallel}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def log(run) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def checkpoint(run, step: int) -> dict:
    """Model and EMA weights and the trainer state of a run's checkpoint at `step`."""
    path = run / "checkpoints" / f"step_{step:08d}"
    return {
        "model": load_file(path / "model.safetensors"),
        "ema": load_file(path / "ema.safetensors"),
        "trainer": load_trainer_state(path),
    }


def assert_same(a: dict, b: dict) -> None:
    """Two checkpoints hold the same weights, EMA and optimizer state, bit for bit."""
    for which in ("model", "ema"):
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), f"{which}:{k} differs"
    oa, ob = a["trainer"]["optimizer"], b["trainer"]["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]  # hyper-parameters, index layout
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), f"optimizer state {i}.{k} differs"
    for k in ("step", "ema_updates"):
        assert a["trainer"][k] == b["trainer"][k]
    assert torch.equal(a["trainer"]["torch_rng"], b["trainer"]["torch_rng"])


def resume_from(source, step: int, dest):
    """A copy of run `source` as it was when it saved `step` (later checkpoints dropped): what
    a run stopped at `step` leaves (the schedule depends on train.total_steps only)."""
    shutil.copytree(source, dest)
    for path in (dest / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    return dest


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    out = {"ddp": root / "ddp", "fsdp": root / "fsdp"}
    torchrun(out["ddp"], "ddp", 6, *TINY, *STEPS)
    torchrun(out["fsdp"], "fsdp", 6, *TINY, *STEPS)
    # 3 + 3 steps under fsdp: from the fsdp run's step-3 checkpoint, and from the ddp run's
    out["fsdp_resumed"] = resume_from(out["fsdp"], 3, root / "fsdp_resumed")
    torchrun(out["fsdp_resumed"], "fsdp", 6)
    out["ddp_then_fsdp"] = resume_from(out["ddp"], 3, root / "ddp_then_fsdp")
    torchrun(out["ddp_then_fsdp"], "fsdp", 6)
    return out


@pytest.mark.distributed
def test_fsdp_trains_as_ddp_does(runs):
    assert_same(checkpoint(runs["fsdp"], 3), checkpoint(runs["ddp"], 3))
    assert_same(checkpoint(runs["fsdp"], 6), checkpoint(runs["ddp"], 6))
    ddp, fsdp = log(runs["ddp"]), log(runs["fsdp"])
    steps = [[r for r in x if "loss" in r] for x in (ddp, fsdp)]
    assert [r["loss"] for r in steps[0]] == [r["loss"] for r in steps[1]]
    for a, b in zip(*steps, strict=True):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert a["grad_norm"] < 1.0  # train.grad_clip: the clip never acts (module docstring)
    # the evaluation (main rank, on the gathered EMA) sees the same weights
    assert [r for r in ddp if r.get("event") == "eval"] == [
        r for r in fsdp if r.get("event") == "eval"
    ]
    (end,) = [r for r in fsdp if r.get("event") == "end"]
    assert (
        end["replica_digests"] == [r for r in ddp if r.get("event") == "end"][0]["replica_digests"]
    )  # the full weights, gathered: the same on both ranks and as DDP's
    # MDLM shards per block: 1 block + the stage; each rank holds about half
    assert end["fsdp_units"] == 2
    assert end["trainable_params"] / 2 <= end["trainable_params_local"] < end["trainable_params"]


@pytest.mark.distributed
def test_fsdp_resumes_exactly_from_fsdp_and_ddp_checkpoints(runs):
    assert_same(checkpoint(runs["fsdp_resumed"], 6), checkpoint(runs["fsdp"], 6))
    assert_same(checkpoint(runs["ddp_then_fsdp"], 6), checkpoint(runs["ddp"], 6))
    for run in ("fsdp_resumed", "ddp_then_fsdp"):
        ends = [r for r in log(runs[run]) if r.get("event") == "end"]
        assert [r["steps_this_run"] for r in ends] == [6, 3]


@pytest.mark.distributed
def test_fsdp_checkpoint_loads_and_resumes_in_one_process(runs, tmp_path):
    from diladiff.runs import load_run

    stage, _ = load_run(runs["fsdp"], which="model")
    saved = checkpoint(runs["fsdp"], 6)["model"]
    for k, v in stage.state_dict().items():
        assert torch.equal(v, saved[k]), k
    run = resume_from(runs["fsdp"], 3, tmp_path / "single")
    assert main(["train", "mdlm", "--run-dir", str(run), "train.max_steps=6"]) == 0
    assert [r["steps_this_run"] for r in log(run) if r.get("event") == "end"] == [6, 3]
    a, b = checkpoint(run, 6)["model"], checkpoint(run, 3)["model"]
    assert all(torch.isfinite(v).all() for v in a.values())
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_unknown_parallel_mode_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    args = ["train", "mdlm", "--preset", "tiny", "--run-dir", str(run), *TINY]
    assert main([*args, "train.parallel=zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.parallel must be one of ('ddp', 'fsdp')" in err and len(err.splitlines()) == 1
    assert not run.exists()


# ---------------------------------------------------------------------- the sharding helpers


class Net(torch.nn.Module):
    """Blocks in a ModuleList, a frozen sub-module, a trainable parameter outside the blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(5, 5) for _ in range(2))
        self.frozen = torch.nn.Linear(5, 5).requires_grad_(False)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(self.frozen(x))


def _sharded_clip(rank, port, inputs, out):
    import torch.distributed as dist

    from diladiff.train import sharding

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different weights per rank: shard() starts both from rank 0's
        net = Net()
        sharding.shard(net, torch.device("cpu"), 2, bf16=False)
        net(inputs[rank]).square().sum().backward()
        params = [p for p in net.parameters() if p.requires_grad]
        norm = sharding.clip_grad_norm(params, 0.1)
        out[rank] = {
            "norm": norm,
            "grads": [p.grad.full_tensor() for p in params],
            "frozen_plain": all(not sharding.is_sharded(p) for p in net.frozen.parameters()),
            "trainable_sharded": all(sharding.is_sharded(p) for p in params),
            "describe": sharding.describe(net),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_clip_matches_torch():
    """fully_shard per block and at the root, the frozen module left out (plain tensors); the
    sharded clip gives the norm and clipped gradients torch's clip_grad_norm_ gives for the
    full averaged gradient."""
    inputs = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0))
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_sharded_clip, args=(r, port, inputs, out)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert all(p.exitcode == 0 for p in procs)
        res = [dict(out[0]), dict(out[1])]
    torch.manual_seed(0)  # rank 0's weights
    net = Net()
    for x in inputs:  # the mean over ranks of each rank's gradient
        (net(x).square().sum() / 2).backward()
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, 0.1)
    assert norm > 0.1  # the clip acts
    for r in res:
        assert r["frozen_plain"] and r["trainable_sharded"]
        assert r["describe"]["fsdp_units"] == 3  # 2 blocks + the root
        assert r["describe"]["trainable_params"] == sum(p.numel() for p in params)
        assert torch.allclose(r["norm"], norm, rtol=1e-5)
        for g, p in zip(r["grads"], params, strict=True):
            assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------- a latent stage


@pytest.mark.distributed
def test_ladiff_with_its_frozen_autoencoder_trains_under_fsdp_as_under_ddp(tmp_path):
    """LaDiff: the auto-encoder inside is frozen (FSDP's ignored parameters, replicated) and
    each rank draws whether a micro-batch is self-conditioned (an extra pass of the prior), so
    the stage is one FSDP unit (stages/base.py fsdp_per_block). 3 steps with accumulation; with
    seed 0 the two ranks' self-conditioning draws differ in 4 of the 6 micro-batch pairs."""
    from latent_fixtures import AE_SMALL, PRIOR_SMALL, train

    assert train("mdlm", tmp_path / "mdlm", None, None, "train.max_steps=2") == 0
    ae = tmp_path / "ae"
    assert (
        train("autoencoder", ae, "--init-from", tmp_path / "mdlm", *AE_SMALL, "train.max_steps=2")
        == 0
    )
    extra = ["--autoencoder", str(ae), *PRIOR_SMALL, "train.progress=false"]
    extra += ["train.batch_size=8", "train.micro_batch_size=2"]
    torchrun(tmp_path / "ddp", "ddp", 3, *extra, kind="ladiff")
    torchrun(tmp_path / "fsdp", "fsdp", 3, *extra, kind="ladiff")
    assert_same(checkpoint(tmp_path / "fsdp", 3), checkpoint(tmp_path / "ddp", 3))
    ddp, fsdp = log(tmp_path / "ddp"), log(tmp_path / "fsdp")
    assert [r for r in ddp if r.get("event") == "eval"] == [
        r for r in fsdp if r.get("event") == "eval"
    ]
    (end,) = [r for r in fsdp if r.get("event") == "end"]
    assert end["fsdp_units"] == 1 and len(set(end["replica_digests"])) == 1
