"""`diladiff bench train`: FLOPs counted against analytic counts (a plain MLP with a frozen
layer, attention on the CPU, the MDLM backbone), and the command's JSON on toy runs."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from latent_fixtures import AE_SMALL, PRIOR_SMALL
from torch import nn

from diladiff.cli import main
from diladiff.eval.bench import count_flops, frozen_modules
from diladiff.eval.compute import gflops_per_call


class ThreeLayers(nn.Module):
    def __init__(self, d0, d1, d2, d3):
        super().__init__()
        self.first = nn.Linear(d0, d1)
        self.second = nn.Linear(d1, d2)
        self.third = nn.Linear(d2, d3)

    def forward(self, x):
        return self.third(torch.relu(self.second(torch.relu(self.first(x)))))


def test_mlp_flops_match_the_analytic_count_with_the_frozen_layer_apart():
    b, d0, d1, d2, d3 = 5, 12, 24, 16, 8
    net = ThreeLayers(d0, d1, d2, d3)
    net.first.requires_grad_(False)
    x = torch.randn(b, d0)  # needs no gradient, nor does the frozen layer's output
    assert frozen_modules(net) == ["first"]

    fwd = count_flops(lambda: net(x), net)
    assert fwd["total"] == 2 * b * (d0 * d1 + d1 * d2 + d2 * d3)
    assert fwd["frozen"] == 2 * b * d0 * d1

    full = count_flops(lambda: net(x).sum().backward(), net)
    # backward: the third layer's weight and input gradients, the second's weight gradient only
    backward = 2 * b * d2 * d3 * 2 + 2 * b * d1 * d2
    assert full["total"] == fwd["total"] + backward
    assert full["frozen"] == 2 * b * d0 * d1
    assert full["trainable"] == full["total"] - full["frozen"]


class CallsThroughAMethod(nn.Module):
    """A frozen part whose own forward never runs, only its submodules (as ae.encode)."""

    def __init__(self, d0, d1, d2):
        super().__init__()
        self.frozen = ThreeLayers(d0, d1, d1, d1).requires_grad_(False)
        self.head = nn.Linear(d1, d2)

    def forward(self, x):
        return self.head(self.frozen.second(self.frozen.first(x)))


def test_frozen_flops_are_found_below_a_frozen_module_that_is_not_called():
    b, d0, d1, d2 = 3, 6, 10, 4
    net = CallsThroughAMethod(d0, d1, d2)
    x = torch.randn(b, d0)
    full = count_flops(lambda: net(x).sum().backward(), net)
    assert full["frozen"] == 2 * b * (d0 * d1 + d1 * d1)  # forward only: nothing needs grads
    assert full["trainable"] == 2 * b * d1 * d2 * 2  # the head's forward and weight gradient


class Attention(nn.Module):
    def forward(self, q):
        return F.scaled_dot_product_attention(q, q, q)


def test_cpu_attention_flops_are_counted():
    """The fused CPU kernel is missing from torch's registry: without the added formulas the
    count would be 0 here."""
    b, h, s, d = 2, 3, 16, 8
    q = torch.randn(b, h, s, d, requires_grad=True)
    net = Attention()
    fwd = count_flops(lambda: net(q), net)["total"]
    assert fwd == 4 * b * h * s * s * d  # scores and weighted sum, 2 FLOPs per multiply-add
    full = count_flops(lambda: net(q).sum().backward(), net)["total"]
    assert full == fwd + 2.5 * fwd  # a fused backward recomputes the scores: 5 products


QUICK = ["train.batch_size=8", "train.progress=false", "--steps", "1", "--warmup-steps", "0"]


def bench_json(capsys, *argv):
    code = main(["bench", "train", *argv, "--json"])
    assert code == 0
    return json.loads(capsys.readouterr().out)  # stdout holds the one JSON object


def check_speed_figures(res):
    for key in ("s_per_step", "tokens_per_s", "flops_per_step", "forward_flops_per_step"):
        assert res[key] > 0, key
    assert res["tokens_per_s"] == pytest.approx(
        res["batch_size"] * res["seq_len"] / res["s_per_step"]
    )
    assert res["s_per_step_min"] <= res["s_per_step"] <= res["s_per_step_max"]
    peak = res["peak_flops_per_s"][res["precision"]]
    assert peak > 0
    assert res["mfu"] == pytest.approx(res["flops_per_step"] / res["s_per_step"] / peak)
    assert 0 < res["mfu"] <= 1.5
    assert res["trainable_flops_per_step"] + res["frozen_flops_per_step"] == pytest.approx(
        res["flops_per_step"]
    )


def test_bench_train_mdlm_counts_the_backbone_analytically(capsys):
    res = bench_json(
        capsys, "mdlm", "--preset", "tiny", *TINY, "--warmup-steps", "1", "--steps", "2"
    )
    check_speed_figures(res)
    cfg = dict(item.split("=") for item in TINY)
    depth, width, seq = (int(cfg[k]) for k in ("model.depth", "model.width", "data.seq_len"))
    # compute.py counts multiply-adds (the paper's convention); the counter 2 FLOPs each
    backbone = res["batch_size"] * 2e9 * gflops_per_call(depth, width, seq)
    assert res["forward_flops_by_module"]["net.backbone"] == pytest.approx(backbone, rel=1e-6)
    # everything trains: backward about twice the forward
    assert res["flops_per_step"] == pytest.approx(3 * res["forward_flops_per_step"], rel=0.1)
    assert res["frozen_flops_per_step"] == 0 and res["frozen_params"] == 0


def test_bench_train_autoencoder_from_a_run_inherits_it_and_splits_off_the_features(
    trained_run, capsys
):
    # the parent's sections (data.seq_len 32, not the preset's 64) come with --init-from; without
    # the feature cache the frozen feature model (held outside state_dict) runs in every step
    argv = ["autoencoder", "--preset", "tiny", "--init-from", str(trained_run), *QUICK]
    res = bench_json(capsys, *argv, "autoencoder.feature_cache=false")
    check_speed_figures(res)
    assert str(res["seq_len"]) == dict(x.split("=") for x in TINY)["data.seq_len"] != "64"
    assert res["frozen_params"] > 0 and res["trainable_params"] > 0
    assert 0 < res["frozen_flops_per_step"] < res["flops_per_step"]
    # the frozen feature model runs forward only: the same FLOPs as in the forward alone
    assert res["frozen_flops_per_step"] == pytest.approx(res["forward_flops_by_module"]["features"])


def test_bench_train_ladiff_without_parent_runs_counts_its_frozen_autoencoder(capsys):
    """A fresh auto-encoder (no --autoencoder run) has no statistics of its own; the frozen
    auto-encoder runs through its methods (ae.encode), never its own forward."""
    argv = ["ladiff", "--preset", "tiny", *TINY, *AE_SMALL, *PRIOR_SMALL, *QUICK]
    # prepare() standardises the prior space from few rows: its cost is not timed
    res = bench_json(
        capsys, *argv, "autoencoder.feature_cache=false", "diffusion.latent_stats_rows=16"
    )
    check_speed_figures(res)
    forward = res["forward_flops_by_module"]
    # the frozen auto-encoder runs forward only (no gradient flows back into it)
    assert res["frozen_flops_per_step"] == pytest.approx(
        forward["ae.features"] + forward["ae.encoder"]
    )
    # the prior trains: its backward is counted too (at most 2.5 times its forward)
    assert forward["prior"] < res["trainable_flops_per_step"] <= 3.5 * forward["prior"]


def test_bench_train_prints_a_table_without_json(capsys):
    argv = ["bench", "train", "mdlm", "--preset", "tiny", *TINY, *QUICK]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| s_per_step | tokens_per_s |" in out and "| mfu |" in out
    assert "measured matmul peak: fp32" in out


def test_bench_train_unknown_stage_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "nonsense", "--preset", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "invalid choice" in err[0]


def test_bench_sample_still_rejects_config_overrides(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "sample", "some/run", "train.lr=1"])
    assert exc.value.code == 2
    assert "unrecognized arguments: train.lr=1" in capsys.readouterr().err
