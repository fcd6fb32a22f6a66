"""`diladiff eval-latent` and the oracle / noise-latent controls on a tiny trained chain."""

import json

import pytest
import torch
from latent_fixtures import train

from diladiff.cli import main
from diladiff.eval.latent_diag import reference_latents, same_latent_space, sampler_grid
from diladiff.eval.oracle import control_latents, decode_latents, oracle_rows, token_recovery
from diladiff.runs import load_run
from diladiff.sampling.masked import SamplerSettings


@pytest.fixture(scope="module")
def chain(latent_chain, tmp_path_factory):
    # the shared chain plus a DiLaDiff student of its LaDiff (a copy: the session's dict is
    # shared with other modules)
    runs = {**latent_chain, "diladiff": tmp_path_factory.mktemp("lchain") / "diladiff"}
    assert (
        train("diladiff", runs["diladiff"], "--teacher", runs["ladiff"], "train.max_steps=2") == 0
    )
    return runs


def eval_latent(run, out, *extra):
    args = ["eval-latent", str(run), "--num-samples", "6", "--train-rows", "10", "--json", str(out)]
    return main([*args, *extra])


def test_eval_latent_on_a_ladiff_run(chain, tmp_path, capsys):
    out = tmp_path / "l.json"
    assert eval_latent(chain["ladiff"], out, "--cont-steps", "8,2") == 0
    printed = capsys.readouterr().out
    assert "frechet" in printed and "nn_ratio" in printed
    res = json.loads(out.read_text())
    assert res["protocol"]["version"].startswith("diladiff-eval")
    assert res["protocol"]["num_samples"] == 6 and res["protocol"]["train_reference_rows"] == 10
    rows = {r["sampler"]: r for r in res["metrics"]["rows"]}
    assert list(rows) == [
        "encoder train (floor)",
        "encoder held-out",
        "ladiff N_cont=8",
        "ladiff N_cont=2",
    ]
    assert rows["ladiff N_cont=8"]["cont_nfe"] == 8 and rows["ladiff N_cont=2"]["cont_nfe"] == 2
    assert rows["encoder held-out"]["nn_ratio"] == pytest.approx(1.0)
    for name in ("encoder train (floor)", "ladiff N_cont=8"):
        r = rows[name]
        assert r["frechet"] >= 0 and r["nn_ratio"] > 0 and r["sq_norm"] > 0
        assert r["mean_abs_mean_diff"] >= 0 and r["mean_abs_log_sd_ratio"] >= 0


def test_eval_latent_on_a_diladiff_run_crosses_cont_steps_and_gammas(chain, tmp_path):
    out = tmp_path / "d.json"
    assert eval_latent(chain["diladiff"], out, "--gamma", "0,0.3") == 0
    names = [r["sampler"] for r in json.loads(out.read_text())["metrics"]["rows"]]
    assert names[2:] == ["diladiff N_cont=5 gamma=0", "diladiff N_cont=5 gamma=0.3"]
    stage, _ = load_run(chain["diladiff"])
    assert sampler_grid(stage, [5, 2], [0.0]) == [
        {"cont_steps": 5, "gamma": 0.0},
        {"cont_steps": 2, "gamma": 0.0},
    ]
    assert sampler_grid(stage)[1]["gamma"] > 0  # the default: gamma 0 and gamma > 0


def test_eval_latent_refuses_runs_without_a_prior(chain, tmp_path, capsys):
    assert eval_latent(chain["mdlm"], tmp_path / "m.json") == 2
    assert "latent prior" in capsys.readouterr().err
    assert eval_latent(chain["ladiff"], tmp_path / "g.json", "--gamma", "0.2") == 2


def test_diladiff_shares_its_teachers_reference_latents(chain):
    teacher, tok = load_run(chain["ladiff"])
    student, _ = load_run(chain["diladiff"])
    refs = reference_latents(teacher, tok, 4, 6)
    assert refs["heldout"].shape == (4, *teacher.latent_shape)
    assert len(refs["train_floor"]) == 4 and len(refs["train_ref"]) == 6
    assert same_latent_space(student, refs, "cpu")
    with torch.no_grad():
        student.prior_norm.mean.add_(1.0)  # another prior space
    assert not same_latent_space(student, refs, "cpu")


def test_token_recovery_by_hand():
    assert token_recovery([[1, 2, 3, 4]], [[1, 2, 0, 0]]) == 0.5
    assert token_recovery([[1, 2], [3, 4]], [[1, 2], [3, 4]]) == 1.0
    with pytest.raises(ValueError):
        token_recovery([[1, 2]], [[1, 2, 3]])


def test_oracle_and_noise_latent_controls_decode_and_score_recovery(chain):
    stage, tok = load_run(chain["ladiff"])
    rows, meta = oracle_rows(stage, tok, 4)
    assert rows.shape == (4, stage.seq_len)
    assert meta["oracle_rows"].startswith("val[") and not meta["overlaps_mauve_reference"]
    latents = control_latents(stage, rows, 0, 3, "cpu")
    with torch.no_grad():
        # in the same batches of 3: a bf16 feature model (CPUs with native bf16) is not
        # batch-invariant to 1e-5
        x = torch.from_numpy(rows)
        enc = torch.cat([stage.ae.encode(x[:3]), stage.ae.encode(x[3:])])
        assert torch.allclose(latents["oracle"], enc, atol=1e-5)
    assert latents["noise_latent"].shape == latents["oracle"].shape
    # another row's latent: row i decodes row i + 1's encoding
    assert torch.equal(latents["other_row_latent"][0], latents["oracle"][1])
    assert torch.equal(latents["other_row_latent"][-1], latents["oracle"][0])
    settings = SamplerSettings(steps=4)
    gen = decode_latents(stage, tok, latents["oracle"], settings, 0, 3, "cpu")
    assert len(gen.ids) == len(gen.texts) == 4 and gen.stats["disc_nfe"] > 0
    again = decode_latents(stage, tok, latents["oracle"], settings, 0, 3, "cpu")
    assert gen.ids == again.ids  # seeded
    assert 0.0 <= token_recovery(gen.ids, rows) <= 1.0


def count_latent_draws(monkeypatch, *classes) -> list[tuple]:
    """Record (kind, cont_steps, gamma, batch) of every latent draw of `classes` (at their
    latent samplers, sampling.latent.LATENT_SAMPLERS)."""
    from diladiff.sampling.latent import LATENT_SAMPLERS

    calls = []
    for name in dict.fromkeys(cls.latent_sampler for cls in classes):

        def counted(model, shape, settings, generator, device, _real=LATENT_SAMPLERS[name]):
            calls.append((model.kind, settings.steps, settings.gamma, shape[0]))
            return _real(model, shape, settings, generator, device)

        monkeypatch.setitem(LATENT_SAMPLERS, name, counted)
    return calls


def test_latent_cache_draws_each_batch_once_and_serves_fresh_draws_exactly(chain, monkeypatch):
    from diladiff.eval.latent_cache import LatentCache
    from diladiff.eval.latent_diag import sample_prior
    from diladiff.methods.ladiff.stage import LaDiff

    stage, _ = load_run(chain["ladiff"])
    calls = count_latent_draws(monkeypatch, LaDiff)
    cache = LatentCache()

    def prior(num, cont=3):
        return cache.prior(stage, "run", num, cont, 0.0, 0, 4, "cpu")

    z6, info = prior(6)  # one batch of 4, one of 2
    assert len(calls) == 2 and cache.draws == 2 and z6.shape == (6, *stage.latent_shape)
    assert info["cont_nfe"] == 3 and not info["latent_reused"] and info["latent_s"] > 0
    del calls[:]
    fresh = {n: sample_prior(stage, n, 3, 0.0, 0, 4, "cpu")[0] for n in (4, 5, 6, 8)}
    del calls[:]
    assert torch.equal(z6, fresh[6])
    z4, info4 = prior(4)  # the first whole batch: nothing drawn
    assert calls == [] and torch.equal(z4, fresh[4]) and info4["latent_reused"]
    assert prior(6)[0].equal(z6) and calls == []
    z5, info5 = prior(5)  # batch 1 from the stream, a batch of 1 from the saved state
    assert calls == [("ladiff", 3, 0.0, 1)] and torch.equal(z5, fresh[5])
    assert info5["latent_reused"]  # its first batch was drawn before
    z8, _ = prior(8)  # the stream grows by its second whole batch
    assert calls[1:] == [("ladiff", 3, 0.0, 4)] and torch.equal(z8, fresh[8])
    prior(4, cont=2)  # another N_cont: another stream
    assert calls[2:] == [("ladiff", 2, 0.0, 4)] and cache.draws == 5


def test_generated_rows_decode_the_same_latents_at_every_n_disc(chain, monkeypatch):
    import copy

    from diladiff.eval import oracle
    from diladiff.eval.latent_cache import LatentCache, generate_from_cache
    from diladiff.eval.latent_diag import sample_prior
    from diladiff.methods.diladiff.stage import DiLaDiff
    from diladiff.methods.ladiff.stage import LaDiff
    from diladiff.sampling.generate import sampler_settings

    stage, tok = load_run(chain["ladiff"])
    calls = count_latent_draws(monkeypatch, LaDiff, DiLaDiff)
    decoded = []
    real_decode = oracle.decode_latent

    def decode(stage, z_ae, settings, generator, device, progress=False):
        decoded.append((settings.steps, z_ae.clone()))
        return real_decode(stage, z_ae, settings, generator, device, progress)

    monkeypatch.setattr(oracle, "decode_latent", decode)
    cache = LatentCache()
    sc = copy.deepcopy(stage.cfg.sample)
    sc.num_samples, sc.batch_size, sc.seed, sc.cont_steps = 6, 4, 0, 3
    gens = {}
    for n_disc in (2, 8):
        sc.disc_steps = n_disc
        gens[n_disc] = generate_from_cache(stage, tok, sc, cache, "ladiff", "cpu")
    assert calls == [("ladiff", 3, 0.0, 4), ("ladiff", 3, 0.0, 2)]  # once, for both N_disc
    assert [s for s, _ in decoded] == [2, 2, 8, 8]
    for (_, a), (_, b) in zip(decoded[:2], decoded[2:], strict=True):
        assert torch.equal(a, b)
    z = sample_prior(stage, 6, 3, 0.0, 0, 4, "cpu")[0]
    assert torch.equal(torch.cat([d for _, d in decoded[:2]]), stage.to_decoder_space(z))
    first, second = gens[2].stats, gens[8].stats
    assert not first["latent_reused"] and second["latent_reused"]
    assert first["latent_s"] == second["latent_s"] > 0  # measured once, attributed to both
    assert gens[8].seconds >= second["latent_s"] + second["decode_s"] - 1e-9
    assert second["cont_nfe"] == 2 * 3  # summed over the 2 batches, as generate() reports
    # decoding: a generator seeded seed + 1, batch after batch
    again = decode_latents(
        stage, tok, z, sampler_settings(sc, stage.seq_len), 1, 4, "cpu", prior_space=True
    )
    assert again.ids == gens[8].ids and len(gens[2].ids) == 6

    # DiLaDiff: gamma 0 and gamma > 0 are separate draws; the run's config is left as it was
    student, stok = load_run(chain["diladiff"])
    del calls[:]
    run_gamma = student.cfg.sample.gamma
    for gamma in (0.0, 0.3, 0.0):
        cache.prior(student, "diladiff", 4, 2, gamma, 0, 4, "cpu")
    assert calls == [("diladiff", 2, 0.0, 4), ("diladiff", 2, 0.3, 4)]
    assert student.cfg.sample.gamma == run_gamma
