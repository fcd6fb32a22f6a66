"""`diladiff eval-ppl`: a perplexity bound on any corpus for an MDLM, an auto-encoder, a
LaDiff or a LADD run (zero-shot perplexity: e.g. a wiki-vital model on `austen`). Every figure
is an upper bound on a negative log-likelihood of L-token rows, in nats per token (divided by
L), and as a perplexity exp(.); `bound` in the result names which likelihood.

- MDLM: the discrete-ratio bound on -log p(x) (eval/recon.py `discrete_ratio_bound`, the
  estimator eval-recon reports; the same rows, seed and draws give the same number).
- Auto-encoder: the same bound for its decoder given the encoder's latent of x: a bound on
  -log p(x | z = E(x)), not on -log p(x) (`conditional: true`; x is seen through its latent).
- LADD (Co-LADD, Di-LADD): the token channel's bound given the latent path of the row's own
  encoder latent (methods/ladd/stage.py `token_nll_bound`: weight 1/t, the latent noised as in
  training), on fresh times, masks and latent noise per draw: a bound on E[-log p(x | latent
  path of E(x))], the paper's data Val PPL (docs/methods/ladd.md#evaluation), not on
  -log p(x) of the generative model, so not comparable with an MDLM's (`conditional: true`).
- LaDiff: a variational bound, *reconstructed* for this project (the paper's App. G.2 formula was
  not recovered: docs/methods/ladiff.md#perplexity-bound; the JSON says `construction:
  reconstructed`). Everything lives in the prior's standardised space z = (E(x) - m) / s
  (stage.prior_latents), so no log-determinant of the standardiser enters: the decoder's
  conditioning map (decoder space m + s z) is part of p_theta(x | z), a deterministic function of z
  inside a likelihood.

  The generative model, for a time t0 in (0, 1) (the "model at t0"): z_1 ~ N(0, I), the
  probability-flow ODE of the prior's x0-denoiser from 1 down to t0 gives z_t0 with density
  p_psi,t0 (processes.flow_likelihood), then x ~ p_theta(x | g(z_t0)) with the final
  x0-prediction jump g(z) = z_psi(z, t0) (how the DPM-Solver++ and DDPM samplers end; as
  t0 -> 0, g -> the identity and the model -> the exact PF-ODE sampler). The encoder is
  deterministic and has no density, so the variational posterior is the VP forward kernel at
  t0 around the encoder's latent,

      q(z_t0 | x) = N(alpha_t0 E_p(x), sigma_t0^2 I),   D = N_z d_z dimensions,

  and Jensen's inequality gives, for any t0,

      -log p(x) <= E_q[-log p_theta(x | g(z_t0))]          (decoder term)
                 + E_q[-log p_psi,t0(z_t0)]                 (prior term)
                 - H(q),   H(q) = (D / 2) log(2 pi e sigma_t0^2)   (posterior entropy),

  the decoder term the discrete-ratio bound of the decoder given decoder-space latents of
  g(z_t0), the prior term by the PF-ODE: log p_psi,t0(z) = log N(z_1; 0, I) + int_{t0}^{1}
  div v(z_t, t) dt (RK45, Hutchinson divergence). One draw of q per row, shared by both terms
  (and, with one seed, by every t0: common random numbers across t0).

  The denoiser in the ODE is z_psi(z_t, t) without self-conditioning (z_sc = None): the
  change of variables needs one vector field of (z, t), and the sampler's self-conditioning
  (the previous step's prediction) depends on the path, not on (z, t); LaDiff trains the plain
  call on a 1 - diffusion.self_cond_prob share of its batches (0.5 by default). A run trained
  with self_cond_prob = 1 never trained that call; it gets the fixed two-pass field
  z_psi(z, t, z_psi(z, t)) instead, differentiated through both passes (`denoiser` in the
  JSON says which).

  The command reports the bound at each t0 of a grid (`per_t0`) and the tightest as `nll_bound`.
  The first grid time is diffusion.t_eps, the schedule's smallest noise level (the model
  closest to LaDiff's sampler, `at_t_eps`); an undertrained prior's denoiser is far from the
  identity there (z - z_psi(z, t) ~ 0.2 at t = 0.01 on the demo), the ODE's velocity ~
  (z - alpha z_hat) / t pushes the encoder's latents far out, and that bound is enormous.
  Larger t0 give bounds on models that stop the ODE earlier; as t0 -> 1 the prior term -> 0
  and the bound -> the decoder's given a latent that ignores x. The minimum over t0 is chosen
  on the evaluated rows (a small optimism with a handful of t0); the per-t0 terms show where
  the latent pays for its cost.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from diladiff.config import ConfigError
from diladiff.data.packing import prepare_data
from diladiff.data.sources import source_from_config
from diladiff.eval.recon import discrete_ratio_bound, stage_denoiser
from diladiff.processes.flow_likelihood import pf_ode_log_likelihood
from diladiff.processes.gaussian import alpha_sigma
from diladiff.runs import load_run
from diladiff.stages import LatentStage
from diladiff.stages.protocols import LatentConditioned, TokenChannelBound, X0Prior

# later q(z | x) times after diffusion.t_eps (the default grid)
DEFAULT_T0S = (0.01, 0.1, 0.4, 0.8)


def corpus_rows(stage, tok, source: str | None, count: int, heldout_docs: int | None, device):
    """`count` held-out rows of `source` (default: the run's own data), tokenised and packed
    with the run's tokenizer and L; the last `heldout_docs` documents are held out (default:
    the run's data.heldout_docs; for another corpus with no more documents than that, half of
    its documents: the model saw none of them, the split only picks which to read)."""
    cfg = dataclasses.replace(stage.cfg.data, max_docs=0)
    if source:
        cfg = dataclasses.replace(cfg, source=source)
    if heldout_docs:
        cfg = dataclasses.replace(cfg, heldout_docs=heldout_docs)
    elif source and source != stage.cfg.data.source and not cfg.streaming:
        docs = len(source_from_config(cfg))
        if cfg.heldout_docs >= docs > 1:
            cfg = dataclasses.replace(cfg, heldout_docs=docs // 2)
    data = prepare_data(cfg, tok, progress=False)
    rows = torch.from_numpy(np.asarray(data.val[:count], dtype=np.int64)).to(device)
    if not len(rows):
        raise ConfigError(f"{cfg.source!r} has no held-out rows of {cfg.seq_len} tokens")
    return rows


def _masked_bound(stage, x0, mc_samples, seed, device, condition=None):
    gen = torch.Generator(device).manual_seed(seed)
    log_probs, default_condition = stage_denoiser(stage)
    cond = condition if condition is not None else default_condition
    return discrete_ratio_bound(log_probs, x0, stage.mask_id, mc_samples, gen, condition=cond)


def prior_denoiser(stage):
    """(x0_fn(z, t), description): the vector field's denoiser (module docstring)."""
    if stage.cfg.diffusion.self_cond_prob < 1.0:
        return (lambda z, t: stage.x0(z, t)), "z_psi(z_t, t) (no self-conditioning)"
    return (
        lambda z, t: stage.x0(z, t, stage.x0(z, t)),
        "z_psi(z_t, t, z_psi(z_t, t)) (two passes: trained only self-conditioned)",
    )


def latent_bound(
    stage, x0, mc_samples, seed, device, probes=1, t0=None, rtol=1e-4, atol=1e-4, batch=16
) -> dict:
    """The reconstructed LaDiff bound (module docstring) on rows x0 at q's time t0 (default
    diffusion.t_eps), per token; the PF-ODE in chunks of `batch` rows."""
    dc = stage.cfg.diffusion
    t0 = t0 or dc.t_eps
    a, s = (float(v) for v in alpha_sigma(torch.tensor(t0, dtype=torch.float64), stage.schedule))
    gen = torch.Generator(device).manual_seed(seed)
    z_p = stage.prior_latents(x0).float()
    z_t0 = a * z_p + s * torch.randn(z_p.shape, generator=gen, device=z_p.device)
    dims = z_p[0].numel()
    x0_fn, denoiser = prior_denoiser(stage)
    log_p, nfe = [], 0
    bar = tqdm(total=len(x0), desc=f"PF-ODE t0={t0:g}", unit="seq", leave=False)
    for chunk in z_t0.split(batch):
        lp, calls = pf_ode_log_likelihood(
            x0_fn, chunk, stage.schedule, t0, gen, probes, rtol=rtol, atol=atol
        )
        log_p.append(lp)
        nfe += calls
        bar.update(len(chunk))
    bar.close()
    log_p = torch.cat(log_p)
    entropy = 0.5 * dims * math.log(2 * math.pi * math.e * s**2)
    # g(z_t0) = z_psi(z_t0, t0): the latent the decoder is given
    latents = torch.cat(
        [x0_fn(c, torch.full((len(c),), t0, device=c.device)) for c in z_t0.split(64)]
    )
    # discrete_ratio_bound asks for the latents of x0[i : i + 64] in order, once each
    chunks = iter(stage.to_decoder_space(latents).split(64))
    dec = discrete_ratio_bound(
        stage.decoder_stage.log_probs,
        x0,
        stage.mask_id,
        mc_samples,
        gen,
        batch_size=64,
        condition=lambda rows: next(chunks),
    )
    length = x0.shape[1]
    prior_nll = float(-log_p.mean()) / length
    spread = float(log_p.std()) / math.sqrt(len(log_p)) / length if len(log_p) > 1 else 0.0
    total = dec["nll_bound"] + prior_nll - entropy / length
    return {
        "nll_bound": total,
        "ppl_bound": math.exp(min(total, 700.0)),  # capped: an exp(700) bound says enough
        "decoder_nll_per_token": dec["nll_bound"],
        "prior_nll_per_token": prior_nll,
        "posterior_entropy_per_token": entropy / length,
        "prior_nll_stderr_per_token": spread,  # over rows: data and Hutchinson noise
        "latent_dims": dims,
        "t0": t0,
        "alpha_t0": a,
        "sigma_t0": s,
        "ode_function_evals": nfe,
        "probes": probes,
        "rtol": rtol,
        "atol": atol,
        "denoiser": denoiser,
        "recovery": dec["recovery"],
    }


LADD_BOUND = "E[-log p(x | latent path of E(x))]: LADD token channel, 1/t-weighted ELBO"
LADD_NOTE = (
    "conditioned on the text's own encoder latent: a bound on the token channel's NLL given "
    "that latent, not on -log p(x) of the generative model (not comparable with an MDLM's)"
)


def ladd_bound(stage, x0, mc_samples: int, seed: int, device) -> dict:
    """A LADD stage's token-channel bound on rows x0 (module docstring), mc_samples draws per
    row from a generator seeded `seed`."""
    gen = torch.Generator(device).manual_seed(seed)
    res = stage.token_bound(x0, mc_samples, gen)
    return {
        "bound": LADD_BOUND,
        "note": LADD_NOTE,
        "conditional": True,
        "nll_bound": res["nll_bound"],
        "ppl_bound": math.exp(min(res["nll_bound"], 700.0)),
        "nll_bound_mc_stderr": res["nll_bound_mc_stderr"],
        "estimator": "t ~ U[ladd.t_eps, 1] (low discrepancy), mask w.p. t, weight 1/t",
    }


def _header(run_dir, stage, source, x0, mc_samples: int, seed: int) -> dict:
    out = {"run": str(run_dir), "stage": stage.kind, "data": source or stage.cfg.data.source}
    out.update(sequences=len(x0), seq_len=x0.shape[1], mc_samples=mc_samples, seed=seed)
    return out


@torch.no_grad()
def eval_ppl(
    run_dir,
    source: str | None = None,
    sequences: int = 64,
    mc_samples: int = 32,
    seed: int = 0,
    device="cpu",
    heldout_docs: int | None = None,
    probes: int = 1,
    weights: str = "ema",
    t0s: tuple[float, ...] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> dict:
    """The perplexity bound of a run on `sequences` held-out rows of `source` (LaDiff: at each
    q(z | x) time in `t0s`, default diffusion.t_eps and DEFAULT_T0S; the tightest reported as
    the bound, each in `per_t0`; LADD: the token channel's, `ladd_bound`)."""
    stage, tok = load_run(run_dir, which=weights, device=device)
    if isinstance(stage, TokenChannelBound):
        x0 = corpus_rows(stage, tok, source, sequences, heldout_docs, device)
        return {
            **_header(run_dir, stage, source, x0, mc_samples, seed),
            **ladd_bound(stage, x0, mc_samples, seed, device),
        }
    if isinstance(stage, LatentStage) and (
        not isinstance(stage, X0Prior) or stage.latent_decoding != "masked"
    ):
        raise ConfigError(
            f"eval-ppl bounds MDLM, auto-encoder, LaDiff and LADD runs; {stage.kind} has no "
            "x0-prediction prior with a masked decoder (a DiLaDiff run: use its teacher)"
        )
    if not isinstance(stage, LatentStage) and stage.generation != "masked":
        raise ConfigError(f"eval-ppl has no bound for a {stage.kind} run")
    x0 = corpus_rows(stage, tok, source, sequences, heldout_docs, device)
    out = _header(run_dir, stage, source, x0, mc_samples, seed)
    if isinstance(stage, LatentStage):
        t_eps = stage.cfg.diffusion.t_eps
        t0s = tuple(t0s) if t0s else (t_eps, *(t for t in DEFAULT_T0S if t > t_eps))
        per_t0 = [
            latent_bound(stage, x0, mc_samples, seed, device, probes, t0, rtol, atol)
            for t0 in tqdm(t0s, desc="eval-ppl (per t0)", leave=False)
        ]
        best = min(per_t0, key=lambda r: r["nll_bound"])
        out.update(
            bound="-log p(x): LaDiff ELBO, tightest t0",
            construction="reconstructed",
            conditional=False,
            at_t_eps=next((r for r in per_t0 if r["t0"] == t_eps), None),
        )
        return {**out, **best, "per_t0": per_t0}
    bound = _masked_bound(stage, x0, mc_samples, seed, device)
    conditional = isinstance(stage, LatentConditioned)
    what = "-log p(x | E(x))" if conditional else "-log p(x)"
    keep = ("nll_bound", "ppl_bound", "recovery")
    return {**out, "bound": what, "conditional": conditional, **{k: bound[k] for k in keep}}
