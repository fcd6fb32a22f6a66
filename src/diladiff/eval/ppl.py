"""`diladiff eval-ppl`: a perplexity bound on any corpus for an MDLM, an auto-encoder or a
LaDiff run (zero-shot perplexity: e.g. a wiki-vital model on `austen`).

- MDLM: the discrete-ratio bound on -log p(x) (eval/recon.py).
- Auto-encoder: the same bound for its decoder given the encoder's latent of x: a bound on
  -log p(x | z = E(x)), not on -log p(x) (`conditional: true`).
- LaDiff (reconstructed; DESIGN.md does not give App. G.2's formula): the encoder is
  deterministic and has no density, so take the variational posterior q(z | x) = the VP
  forward kernel at the schedule's smallest time t0 = diffusion.t_eps in prior space,
  z_t0 = alpha_t0 E_p(x) + sigma_t0 eps, and bound

      -log p(x) <= E_q[-log p_theta(x | z)] + E_q[-log p_psi(z_t0)] - H(q),
      H(q) = (D / 2) log(2 pi e sigma_t0^2),   D = N_z d_z,

  with -log p_theta(x | z) the decoder's discrete-ratio bound given the decoder-space latent
  of z_t0 / alpha_t0, and log p_psi(z_t0) the prior's probability-flow ODE log-likelihood
  (processes.flow_likelihood: RK45 via torchdiffeq, Hutchinson divergence, the denoiser without
  self-conditioning: the ODE needs one fixed vector field). One draw of eps per row. Every t0
  gives a valid bound (sigma_t0 is a free parameter of q): the command evaluates a few and
  reports each and the tightest. At the training t_eps (1e-4) an undertrained prior's
  denoiser is far from the identity (the ODE's velocity ~ (z - alpha z_hat) / t), and the
  bound is millions of nats; from t0 ~ 0.05 it is finite and close to the decoder's.

Reported per token (nats, divided by L) and as a perplexity exp(.); the LaDiff terms also
separately.
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
    return torch.from_numpy(np.asarray(data.val[:count], dtype=np.int64)).to(device)


def _masked_bound(stage, x0, mc_samples, seed, device, condition=None):
    gen = torch.Generator(device).manual_seed(seed)
    log_probs, default_condition = stage_denoiser(stage)
    cond = condition if condition is not None else default_condition
    return discrete_ratio_bound(log_probs, x0, stage.mask_id, mc_samples, gen, condition=cond)


def latent_bound(
    stage, x0, mc_samples, seed, device, probes=1, t0=None, rtol=1e-4, atol=1e-4
) -> dict:
    """The reconstructed LaDiff bound (module docstring) on rows x0, per token; t0 defaults to
    diffusion.t_eps."""
    dc = stage.cfg.diffusion
    t0 = t0 or dc.t_eps
    a, s = (float(v) for v in alpha_sigma(torch.tensor(t0, dtype=torch.float64), dc.d))
    gen = torch.Generator(device).manual_seed(seed)
    z_p = stage.prior_latents(x0).float()
    z_t0 = a * z_p + s * torch.randn(z_p.shape, generator=gen, device=z_p.device)
    dims = z_p[0].numel()
    log_p, nfe = pf_ode_log_likelihood(
        lambda z, t: stage.x0(z, t), z_t0, dc.d, t0, gen, probes, rtol=rtol, atol=atol
    )
    entropy = 0.5 * dims * math.log(2 * math.pi * math.e * s**2)
    # discrete_ratio_bound asks for the latents of x0[i : i + batch] in order, once each
    batch = 64
    chunks = iter(stage.to_decoder_space(z_t0 / a).split(batch))
    log_probs = stage.decoder_stage.log_probs
    dec = discrete_ratio_bound(
        log_probs,
        x0,
        stage.mask_id,
        mc_samples,
        gen,
        batch_size=batch,
        condition=lambda rows: next(chunks),
    )
    length = x0.shape[1]
    prior_nll = float(-log_p.mean()) / length
    kl_part = prior_nll - entropy / length
    total = dec["nll_bound"] + kl_part
    return {
        "nll_bound": total,
        "ppl_bound": math.exp(min(total, 700.0)),  # capped: an exp(700) bound says enough
        "decoder_nll_per_token": dec["nll_bound"],
        "prior_nll_per_token": prior_nll,
        "posterior_entropy_per_token": entropy / length,
        "latent_dims": dims,
        "t0": t0,
        "ode_function_evals": nfe,
        "probes": probes,
        "recovery": dec["recovery"],
    }


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
    t0s: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.4),
) -> dict:
    """The perplexity bound of a run on `sequences` held-out rows of `source` (LaDiff: at each
    q(z | x) time in `t0s`, the tightest reported as the bound)."""
    stage, tok = load_run(run_dir, which=weights, device=device)
    x0 = corpus_rows(stage, tok, source, sequences, heldout_docs, device)
    out = {"run": str(run_dir), "stage": stage.kind, "data": source or stage.cfg.data.source}
    out.update(sequences=len(x0), seq_len=x0.shape[1], mc_samples=mc_samples, seed=seed)
    if isinstance(stage, LatentStage):
        if not hasattr(stage, "x0") or stage.latent_decoding != "masked":
            raise ConfigError(
                f"eval-ppl bounds MDLM, auto-encoder and LaDiff runs; {stage.kind} has no "
                "x0-prediction prior with a masked decoder (a DiLaDiff run: use its teacher)"
            )
        per_t0 = [
            latent_bound(stage, x0, mc_samples, seed, device, probes, t0)
            for t0 in tqdm(t0s, desc="eval-ppl (PF-ODE per t0)", leave=False)
        ]
        best = min(per_t0, key=lambda r: r["nll_bound"])
        out.update(bound="reconstructed LaDiff ELBO (tightest t0)", conditional=False)
        return {**out, **best, "per_t0": per_t0}
    if stage.generation != "masked":
        raise ConfigError(f"eval-ppl has no bound for a {stage.kind} run")
    bound = _masked_bound(stage, x0, mc_samples, seed, device)
    conditional = hasattr(stage, "encode")
    what = "-log p(x | E(x))" if conditional else "-log p(x)"
    keep = ("nll_bound", "ppl_bound", "recovery")
    return {**out, "bound": what, "conditional": conditional, **{k: bound[k] for k in keep}}
