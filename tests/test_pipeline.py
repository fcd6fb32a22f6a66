import json
from collections import Counter

import pytest
import torch
from conftest import TINY
from latent_fixtures import AE_SMALL, PRIOR_SMALL

from diladiff.eval import bench, oracle
from diladiff.methods.diladiff import DiLaDiff
from diladiff.methods.ladiff import LaDiff
from diladiff.pipeline import EvalPlan, run_pipeline
from diladiff.sampling.latent import LATENT_SAMPLERS
from diladiff.train import trainer as trainer_mod
from diladiff.train.checkpoint import latest_checkpoint

STEPS = {
    "mdlm": ["train.max_steps=4"],
    "autoencoder": ["train.max_steps=3", *AE_SMALL],
    "ladiff": ["train.max_steps=6", "train.ckpt_every=2", *PRIOR_SMALL],
    "diladiff": ["train.max_steps=2"],
}
PLAN = EvalPlan(
    scorer="smollm2-135m",
    num_samples=8,
    batch_size=4,
    eval_samplers={"ladiff": ({"cont_steps": 10}, {"cont_steps": 5})},
    frontier_disc=(4, 8),
    bench_batches=(1, 2),
    bench_repeats=1,
    latent_samples=8,
    latent_train_rows=12,
)


@pytest.mark.e2e
def test_pipeline_survives_an_interrupted_stage_and_writes_the_report(tmp_path, monkeypatch):
    root = tmp_path / "pipe"
    real_save = trainer_mod.Trainer.save

    def run():
        return run_pipeline(
            root,
            "tiny",
            [*TINY, "train.progress=false"],
            device_spec="cpu",
            stage_overrides=STEPS,
            plan=PLAN,
        )

    def save_then_die(self):
        real_save(self)
        if self.stage.kind == "ladiff" and self.step == 4:
            raise KeyboardInterrupt  # as if killed during the LaDiff stage

    monkeypatch.setattr(trainer_mod.Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run()
    assert latest_checkpoint(root / "ladiff").name == "step_00000004"
    assert not (root / "ladiff" / "COMPLETE").exists()
    done = {s: (root / s / "COMPLETE").stat().st_mtime for s in ("mdlm", "autoencoder")}
    mdlm_ckpt = latest_checkpoint(root / "mdlm")

    monkeypatch.setattr(trainer_mod.Trainer, "save", real_save)
    draws, decoded = watch_latents(monkeypatch)
    report = run()
    # finished stages were not redone; the interrupted one resumed from its checkpoint
    assert {s: (root / s / "COMPLETE").stat().st_mtime for s in done} == done
    assert latest_checkpoint(root / "mdlm") == mdlm_ckpt
    log = [json.loads(x) for x in (root / "ladiff" / "log.jsonl").read_text().splitlines()]
    (end,) = [r for r in log if r.get("event") == "end"]
    assert end["step"] == 6 and end["steps_this_run"] == 2

    text = report.read_text()
    for row in (
        "mdlm_disc4",
        "ladiff_cont10_disc32",
        "ladiff_cont5_disc4",
        "diladiff_cont5_disc32",
        "diladiff_cont5_gamma0.2_disc4",
        "oracle_disc4",
        "oracle_disc32",
        "other_row_latent_disc4",
        "noise_latent_disc32",
    ):
        assert f"| {row} |" in text
        result = json.loads((root / "eval" / f"{row}.json").read_text())
        lo, hi = result["metrics"]["gen_ppl_ci95"]
        assert lo <= result["metrics"]["gen_ppl"] <= hi
        assert len(result["per_sample"]["tokens"]) == PLAN.num_samples
        controls = ("oracle", "other_row", "noise")
        assert ("token_recovery" in result["metrics"]) == row.startswith(controls)
    oracle = json.loads((root / "eval" / "oracle_disc32.json").read_text())
    assert oracle["generator"]["stage"] == "oracle" and oracle["generator"]["disc_steps"] == 32
    assert not oracle["generator"]["overlaps_mauve_reference"]
    assert "latent_overhead" in text and "gen_ppl" in text and "mauve" in text
    assert "gen_ppl_ci95" in text and "token_recovery" in text
    # latent-prior diagnostics: LaDiff at N_cont 10 and 5, DiLaDiff at gamma 0 and > 0
    assert "## Latent prior diagnostics" in text
    latent = json.loads((root / "eval" / "latent.json").read_text())
    names = [r["sampler"] for r in latent["metrics"]["rows"]]
    assert names[:2] == ["encoder train (floor)", "encoder held-out"]
    assert names[2:4] == ["ladiff N_cont=10", "ladiff N_cont=5"]
    assert names[4].startswith("diladiff N_cont=5 gamma=0") and len(names) == 6
    assert f"| {names[5]} |" in text
    assert (root / "frontier" / "frontier.png").is_file()

    # Prior samples: drawn once per (run, N_cont, gamma) by evaluation, diagnostics and
    # frontier together (2 batches of 4 = the 8 samples; the frontier's 4 are the first batch)
    assert Counter((k, c, g) for k, c, g, _ in draws) == {
        ("ladiff", 10, 0.0): 2,  # evaluation at N_disc 4 and 32, diagnostics
        ("ladiff", 5, 0.0): 2,
        ("ladiff", 200, 0.0): 1,  # the frontier (the run's N_cont), 3 points
        ("diladiff", 5, 0.0): 2,  # evaluation, diagnostics (gamma 0), frontier
        ("diladiff", 5, 0.2): 2,  # evaluation with gamma-sampling, diagnostics (gamma > 0)
    }
    # ... and decoded at both N_disc: (ladiff, N_cont 10) at 4 then 32, then N_cont 5
    z = [zz for kind, _, zz in decoded if kind == "ladiff"][:8]
    assert all(torch.equal(z[i], z[i + 2]) for i in (0, 1, 4, 5))
    assert not torch.equal(z[0], z[4])
    gens = {
        n: json.loads((root / "eval" / f"ladiff_cont10_disc{n}.json").read_text())["generator"]
        for n in (4, 32)
    }
    assert not gens[4]["latent_reused"] and gens[32]["latent_reused"]
    assert gens[4]["latent_s"] == gens[32]["latent_s"] > 0  # measured once, attributed
    assert gens[4]["latent_seed"] == 0 and gens[4]["decode_seed"] == 1
    reused = {r["sampler"]: r.get("latent_reused") for r in latent["metrics"]["rows"][2:]}
    assert list(reused.values()) == [True, True, True, True]
    front = json.loads((root / "frontier" / "frontier.json").read_text())
    assert [p["latent_reused"] for p in front["points"] if p["run"].startswith("ladiff")] == [
        False,
        True,
    ]
    assert all(p["latent_reused"] for p in front["points"] if p["run"].startswith("diladiff"))
    assert (root / "autoencoder" / "recon.png").is_file()


def watch_latents(monkeypatch):
    """Record every latent draw outside the speed benchmark (`bench_sampling` samples for real)
    at the latent samplers (sampling.latent.LATENT_SAMPLERS) as (kind, cont_steps, gamma,
    batch), and every decoding of latents (eval/oracle.py's decode_latent: evaluation rows,
    controls, frontier) as (kind, N_disc, z_ae)."""
    draws, decoded, inside = [], [], []
    real_bench, real_decode = bench.bench_sampling, oracle.decode_latent

    def bench_sampling(*args, **kwargs):
        inside.append(1)
        try:
            return real_bench(*args, **kwargs)
        finally:
            inside.pop()

    def decode(stage, z_ae, settings, generator, device, progress=False):
        if not inside:
            decoded.append((stage.kind, settings.steps, z_ae.clone()))
        return real_decode(stage, z_ae, settings, generator, device, progress)

    for name in (LaDiff.latent_sampler, DiLaDiff.latent_sampler):

        def counted(model, shape, settings, generator, device, _real=LATENT_SAMPLERS[name]):
            if not inside:
                draws.append((model.kind, settings.steps, settings.gamma, shape[0]))
            return _real(model, shape, settings, generator, device)

        monkeypatch.setitem(LATENT_SAMPLERS, name, counted)
    monkeypatch.setattr(bench, "bench_sampling", bench_sampling)
    monkeypatch.setattr(oracle, "decode_latent", decode)
    return draws, decoded
