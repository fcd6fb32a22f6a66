import contextlib
import math
from pathlib import Path

import pytest
import torch

from diladiff.config import Config
from diladiff.errors import TrainingError
from diladiff.eval.bench import _row
from diladiff.eval.genppl import pooled_perplexity
from diladiff.runtime import autocast, cache_root, synchronize
from diladiff.train.trainer import autocast_for


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_cuda_only_for_auto_and_on_any_device_for_bf16():
    assert isinstance(autocast("cpu"), contextlib.nullcontext)
    assert isinstance(autocast(torch.device("cpu"), "fp32"), contextlib.nullcontext)
    ctx = autocast("cpu", "bf16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    with ctx:
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    ctx = autocast(torch.device("cuda"))
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda"
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "fp16")


def test_trainer_precision_uses_the_shared_autocast_and_rejects_bad_values():
    cfg = Config()
    assert isinstance(autocast_for(cfg, torch.device("cpu")), contextlib.nullcontext)
    cfg.train.precision = "bf16"
    assert isinstance(autocast_for(cfg, torch.device("cpu")), torch.autocast)
    cfg.train.precision = "fp16"
    with pytest.raises(TrainingError, match="train.precision"):
        autocast_for(cfg, torch.device("cpu"))


def test_synchronize_accepts_strings_and_devices_and_is_a_no_op_off_cuda():
    synchronize("cpu")
    synchronize(torch.device("cpu"))


def test_cache_root_follows_the_environment(monkeypatch):
    monkeypatch.setenv("DILADIFF_CACHE", "/some/where")
    assert cache_root() == Path("/some/where")
    monkeypatch.delenv("DILADIFF_CACHE")
    assert cache_root() == Path.home() / ".cache" / "diladiff"


class _Stage:
    seq_len = 4


def test_bench_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    runs = [{"wall": w, "disc_nfe": n} for w, n in ((8.0, 1), (1.0, 4), (4.0, 3), (2.0, 2))]
    row = _row(_Stage(), 2, runs)
    assert row["wall_s_per_batch"] == 3.0
    assert row["disc_nfe"] == 2.5
    assert row["tokens_per_s"] == 2 * 4 / 3.0


def test_genppl_median_of_an_even_count_is_the_mean_of_the_two_middle_values():
    nlls = [torch.tensor([math.log(p)]) for p in (2.0, 8.0, 4.0, 16.0)]
    assert pooled_perplexity(nlls)["gen_ppl_median"] == pytest.approx(6.0)
