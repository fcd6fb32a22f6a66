"""`diladiff check parallel-decoding`: a known-answer test of the paper's central mechanism.

The data are K distinct real sequences of exactly L tokens, each with probability 1/K. A
perfect generator emits only those rows, all of them, equally often. Revealing many tokens per
step from a factorised posterior mixes tokens of different rows (word salad that is no row), so
an MDLM's validity must drop as N_disc shrinks; conditioned on a latent that identifies the row,
the tokens are (nearly) independent and validity should survive N_disc = 1 or 2.

    DIR/corpus.jsonl, DIR/corpus_rows.npy     the K rows (text that re-tokenises to them exactly)
    DIR/mdlm  DIR/autoencoder  DIR/ladiff  DIR/diladiff      the normal stage runs (resumable)
    DIR/<method>                              each of --methods (e.g. duo, co-ladd), the same way
    DIR/check.json  DIR/check.md  DIR/check.png              metrics per generator and N_disc

The chain is DiLaDiff's ancestry as the stages declare it (check/plan.py). Generators
(check/generators.py): the MDLM; LaDiff (latent ODE, N_cont 200 and 5); DiLaDiff (N_cont 5,
gamma 0 and gamma-sampling); two controls that isolate the links of the chain: `oracle` (the
decoder given the encoder latent of a random training row: does the auto-encoder work?) and
`noise_latent` (z ~ N(0, I): the decoder as a plain MDLM); and each registered method named in
--methods, trained on the same rows and sampled with each of its stage's `eval_samplers`
(rows named as the pipeline names them, e.g. duo_greedy_tail, co-ladd_joint, ldlm_cont32; a
latent method also gets its own oracle, e.g. ldlm_oracle). A simulated reference,
`exact_factorised`, runs the MDLM sampler with the exact conditionals of the K rows: the best
any MDLM can do at each N_disc (ancestral steps reveal several tokens at once even at
N_disc = L, and those are drawn independently). Every latent generator draws its latents once
and decodes them at every N_disc, so the N_disc axis is paired. The verdict and the outputs:
check/report.py.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from diladiff.check import metrics as M
from diladiff.check.corpus import CheckCorpus, prepare_corpus
from diladiff.check.generators import sample_generators
from diladiff.check.plan import SUBJECT, CheckPlan, disc_grid
from diladiff.check.report import verdict, write_results

CHECK_VERSION = 1


def train_check_stages(root: Path, preset: str, corpus: CheckCorpus, plan: CheckPlan) -> dict:
    """Train the chain and the plan's methods on the corpus (one resumable run folder each
    under root, at the plan's step counts); their training results, numbers and names only."""
    from diladiff.pipeline import train_stages

    results = train_stages(
        root,
        preset,
        corpus.train_overrides,
        stage_overrides=plan.stage_overrides(),
        kinds=[SUBJECT, *plan.methods],
    )
    return {
        kind: {k: v for k, v in r.items() if isinstance(v, (int, float, str))}
        for kind, r in results.items()
    }


def result_record(
    corpus: CheckCorpus,
    preset: str,
    overrides: list[str],
    plan: CheckPlan,
    device,
    generators: dict,
    training: dict,
    seconds: dict,
) -> dict:
    """DIR/check.json: the setting, every generator's metrics per N_disc, the verdict."""
    from diladiff.eval.protocol import device_record

    k, seq_len = corpus.rows.shape
    perfect_mean, perfect_std = M.perfect_sampler_tv(plan.num_samples, k, seed=plan.seed)
    return {
        "check": "parallel-decoding",
        "version": CHECK_VERSION,
        "corpus": {
            "origin": corpus.origin,
            "num_sequences": k,
            "seq_len": seq_len,
            "path": str(corpus.path),
        },
        "preset": preset,
        "overrides": overrides,
        "steps": plan.stage_steps(),
        "num_samples": plan.num_samples,
        "seed": plan.seed,
        "sampler": plan.sampler,
        "device": device_record(device),
        "disc_steps": disc_grid(seq_len),
        "perfect_sampler_tv": {"mean": perfect_mean, "std": perfect_std},
        "generators": generators,
        "verdict": verdict(generators, seq_len),
        "training": training,
        "seconds": seconds,
    }


def run_check(
    root: Path,
    preset: str = "tiny",
    overrides: list[str] | None = None,
    num_sequences: int = 256,
    data: str | None = None,
    plan: CheckPlan | None = None,
    device_spec: str = "auto",
    methods: tuple[str, ...] | list[str] | None = None,
) -> dict:
    """Build the corpus, train the chain (and `methods`, registered stage names, replacing
    the plan's) on it, sample every generator, write DIR/check.* (report.write_results)."""
    from diladiff.train.distributed import pick_device

    plan = plan or CheckPlan()
    if methods is not None:
        plan = replace(plan, methods=tuple(methods))
    plan.check_steps()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    overrides = list(overrides or []) + ([f"data.source={data}"] if data else [])
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = prepare_corpus(root, preset, overrides, num_sequences)
    seconds["corpus_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    training = train_check_stages(root, preset, corpus, plan)
    seconds["train_s"] = time.perf_counter() - t1
    device = pick_device(device_spec)
    t2 = time.perf_counter()
    generators = sample_generators(root, corpus.tok, corpus.rows, plan, device)
    seconds["sample_s"] = time.perf_counter() - t2
    seconds["total_s"] = time.perf_counter() - t0
    args = (corpus, preset, overrides, plan, device, generators, training, seconds)
    result = result_record(*args)
    write_results(root, plan.results_name, result)
    return result
