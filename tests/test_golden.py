"""Golden generations: for every method, the same token ids for the same seed, the same latent
samples (latent stages) and the same validation losses on a short run, against a record kept
in tests/golden/generation.json.

Written before the methods moved into folders (issue 29), so that a reorganisation of the code
shows any change of behaviour. Runs train and sample with one intra-op thread (the same
reduction order under pytest-xdist and serial runs). A CPU with other vector instructions may
still round differently in the last bits, so ids are compared as the share of equal ids per
case (>= 0.95) and losses to a relative 1e-4, not as hashes.

An intended change of behaviour: regenerate the record with
    DILADIFF_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py
and say why in the commit.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY
from latent_fixtures import AE_SMALL, PRIOR_SMALL
from test_ladd import SMALL as LADD_SMALL
from test_ldlm import SMALL as LDLM_SMALL

from diladiff.cli import main

GOLDEN = Path(__file__).parent / "golden" / "generation.json"
UPDATE = os.environ.get("DILADIFF_UPDATE_GOLDEN") == "1"
QUIET = ["train.progress=false"]
RAW = ["--weights", "model"]  # the perturbed weights (`perturb`)
# Each run ends with one evaluation (the trainer evaluates at its last step).
EVAL_AT_END = ["train.eval_every=1000"]

# method -> (parent flag, parent method, overrides); parents listed before their children.
RUNS = {
    "mdlm": (None, None, [*TINY, "train.max_steps=4"]),
    "duo": (None, None, [*TINY, "train.max_steps=4"]),
    "autoencoder": ("--init-from", "mdlm", [*AE_SMALL, "train.max_steps=3"]),
    "ladiff": ("--autoencoder", "autoencoder", [*PRIOR_SMALL, "train.max_steps=3"]),
    "diladiff": ("--teacher", "ladiff", ["train.max_steps=2"]),
    "ldlm": (None, None, [*TINY, *LDLM_SMALL, "train.max_steps=3"]),
    "ldlm_decoder": ("--init-from", "ldlm", [*TINY, "ldlm_decoder.layers=1", "train.max_steps=2"]),
    "co-ladd": (None, None, [*TINY, *LADD_SMALL, "train.max_steps=3"]),
    "di-ladd": (None, None, [*TINY, *LADD_SMALL, "train.max_steps=3"]),
}

DISC = ["--disc-steps", "4"]
# case -> (method, `diladiff sample` flags); 4 samples each, seed 0 (the run's sample.*).
SAMPLES = {
    "mdlm_topk": ("mdlm", [*DISC, "--strategy", "topk"]),
    "mdlm_ancestral": ("mdlm", [*DISC, "--strategy", "ancestral"]),
    "mdlm_threshold": ("mdlm", [*DISC, "--strategy", "threshold"]),
    "mdlm_prompt": ("mdlm", [*DISC, "--strategy", "topk", "--prompt", "The history of"]),
    "mdlm_top_p": ("mdlm", [*DISC, "--strategy", "ancestral", "--top-p", "0.9"]),
    "duo_ancestral": ("duo", [*DISC, "--strategy", "ancestral"]),
    "duo_greedy_tail": ("duo", [*DISC, "--strategy", "greedy_tail"]),
    "ladiff_5": ("ladiff", [*DISC, "--cont-steps", "5"]),
    "ladiff_ddpm": ("ladiff", [*DISC, "--cont-steps", "3", "--latent-sampler", "ddpm"]),
    "ladiff_reference": ("ladiff", [*DISC, "--latent-from", "A city in the north."]),
    "diladiff_5": ("diladiff", [*DISC, "--cont-steps", "5"]),
    "diladiff_gamma": ("diladiff", [*DISC, "--cont-steps", "5", "--gamma", "0.2"]),
    "ldlm_4": ("ldlm", ["--cont-steps", "4"]),
    "ldlm_decoder_4": ("ldlm_decoder", [*DISC, "--cont-steps", "4"]),
    "co-ladd_joint": ("co-ladd", [*DISC, "--inference", "joint"]),
    "di-ladd_joint": ("di-ladd", [*DISC, "--inference", "joint"]),
    "di-ladd_sequential": ("di-ladd", [*DISC, "--inference", "sequential", "--cont-steps", "2"]),
}
# Latent samples of the latent stages' samplers (seed 0, 4 rows), recorded as floats: a few
# training steps leave the decoders' zero-initialised cross-attention near zero, so the ids
# above barely depend on the latent. case -> (method, sample.* settings).
LATENTS = {
    "ladiff_5": ("ladiff", {"cont_steps": 5}),  # its own sampler, ode_euler
    "ladiff_ddpm": ("ladiff", {"cont_steps": 4, "latent_sampler": "ddpm"}),
    "ladiff_sde": ("ladiff", {"cont_steps": 4, "latent_sampler": "sde_euler"}),
    "ladiff_heun": ("ladiff", {"cont_steps": 3, "latent_sampler": "heun"}),
    "ladiff_dpm2m": ("ladiff", {"cont_steps": 3, "latent_sampler": "dpm_solver_2m"}),
    "ladiff_angle": ("ladiff", {"cont_steps": 3, "time_grid": "angle"}),
    "diladiff_5": ("diladiff", {"cont_steps": 5}),
    "diladiff_gamma": ("diladiff", {"cont_steps": 5, "gamma": 0.2}),
    "ldlm_4": ("ldlm", {"cont_steps": 4}),
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb(run: Path) -> None:
    """Add seeded N(0, 0.05^2) noise to every weight and bias of the run's raw weights (the
    newest checkpoint's model.safetensors), so that the zero-initialised layers (output heads,
    adaLN gates, the decoder's cross-attention), still near zero after a few steps, make the
    ids depend on the latent and the latent samples on the prior network. Buffers (statistics,
    counts, codebook usage) are left alone."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from diladiff.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(run) / "model.safetensors"
    with safe_open(path, "pt") as fh:
        meta = fh.metadata()
        weights = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (no __iter__)
    gen = torch.Generator().manual_seed(0)
    for k in sorted(weights):
        if k.endswith((".weight", ".bias")) and weights[k].is_floating_point():
            weights[k] = weights[k] + 0.05 * torch.randn(weights[k].shape, generator=gen)
    save_file(weights, path, metadata=meta)


def last_eval(run: Path) -> dict:
    """The validation metrics of a run's last evaluation record in log.jsonl."""
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if any(k.startswith("val_") for k in r)]
    assert evals, f"{run}: no evaluation record"
    return {k: v for k, v in evals[-1].items() if k.startswith("val_") and isinstance(v, float)}


def record_now(root: Path) -> dict:
    """Train every run, draw every sample case: {"val": method -> metrics, "ids": case -> ids}."""
    runs, val, ids = {}, {}, {}
    for method, (flag, parent, overrides) in RUNS.items():
        runs[method] = root / method
        argv = ["train", method, "--preset", "tiny", "--run-dir", str(runs[method])]
        argv += [flag, str(runs[parent])] if flag else []
        assert main([*argv, *overrides, *QUIET, *EVAL_AT_END]) == 0, method
        val[method] = last_eval(runs[method])
    for run in runs.values():
        perturb(run)
    for case, (method, flags) in SAMPLES.items():
        out = root / f"{case}.jsonl"
        argv = ["sample", str(runs[method]), "--seed", "0", "--num-samples", "4", *RAW]
        assert main([*argv, "--device", "cpu", *flags, "--out", str(out)]) == 0, case
        ids[case] = [json.loads(x)["ids"] for x in out.read_text().splitlines()]
    return {"val": val, "ids": ids, "latents": latents_now(runs)}


def latents_now(runs: dict[str, Path]) -> dict:
    """case -> the latent sampler's output (4 rows, seed 0) as nested lists."""
    from dataclasses import replace

    from diladiff.runs import load_run
    from diladiff.sampling.generate import generation_settings
    from diladiff.sampling.latent import sample_latent

    out = {}
    for case, (method, settings) in LATENTS.items():
        stage, _ = load_run(runs[method], which="model", device="cpu")
        sc = replace(stage.cfg.sample, **settings)
        latent = generation_settings(sc, stage).latent
        z, _ = sample_latent(stage, 4, latent, torch.Generator().manual_seed(0), "cpu")
        out[case] = [[[float(f"{v:.6g}") for v in row] for row in zi] for zi in z.tolist()]
    return out


def equal_share(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.slow
def test_every_method_generates_the_recorded_ids_and_losses(tmp_path, one_thread):
    now = record_now(tmp_path)
    if UPDATE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(now) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    want = json.loads(GOLDEN.read_text())
    assert sorted(now["ids"]) == sorted(want["ids"]) and sorted(now["val"]) == sorted(want["val"])
    shares = {case: equal_share(now["ids"][case], want["ids"][case]) for case in want["ids"]}
    assert all(s >= 0.95 for s in shares.values()), {c: s for c, s in shares.items() if s < 0.95}
    for case, z in want["latents"].items():
        torch.testing.assert_close(
            torch.tensor(now["latents"][case]), torch.tensor(z), rtol=1e-4, atol=1e-5, msg=case
        )
    for method, metrics in want["val"].items():
        assert metrics and sorted(now["val"][method]) == sorted(metrics), method
        for key, value in metrics.items():
            assert now["val"][method][key] == pytest.approx(value, rel=1e-4), (method, key)
