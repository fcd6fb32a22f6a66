"""The check's verdict (its pass criteria and the link a failure points to) and its outputs:
DIR/check.json (the result), DIR/check.md (tables) and DIR/check.png (validity vs N_disc)."""

from __future__ import annotations

import json
from pathlib import Path

from diladiff.check.plan import CHAIN, disc_grid

FAST = (1, 2)  # the N_disc at which a latent generator must produce whole rows


def at(gen: dict, n_disc: int, key: str = "validity") -> float:
    """A generator's metric `key` at N_disc = n_disc."""
    return next(r[key] for r in gen["rows"] if r["disc_steps"] == n_disc)


def criteria(g: dict, seq_len: int) -> dict:
    """The pass criteria: the MDLM valid one token at a time and worse by N_disc = L/8; the
    oracle carrying the row (N_disc = L) and revealing it in 1-2 steps; every prior and
    distilled-prior row valid (>= 0.9) and covering (>= 0.8) at N_disc in {1, 2}; the exact
    prior valid there."""
    mdlm = g[CHAIN.mdlm]
    few = max(at(mdlm, n) for n in disc_grid(seq_len) if n <= seq_len // 8)
    out = {
        f"{CHAIN.mdlm}_valid_at_L": at(mdlm, seq_len) >= 0.9,
        f"{CHAIN.mdlm}_drops_by_L8": few < at(mdlm, seq_len),
        "exact_factorised_valid_at_L": at(g["exact_factorised"], seq_len),
        "oracle_carries_row_at_L": at(g["oracle"], seq_len, "oracle_match") >= 0.9,
        "oracle_parallel_at_1_2": min(at(g["oracle"], n, "oracle_match") for n in FAST) >= 0.9,
    }
    for name in latent_rows(g):
        out[f"{name}_valid_at_1_2"] = min(at(g[name], n) for n in FAST) >= 0.9
        out[f"{name}_coverage_at_1_2"] = min(at(g[name], n, "coverage") for n in FAST) >= 0.8
    for name in (n for n in g if n.startswith("exact_prior")):
        out[f"{name}_valid_at_1_2"] = min(at(g[name], n) for n in FAST) >= 0.9
    return out


def latent_rows(g: dict) -> list[str]:
    """The chain's prior and distilled-prior generators (`<kind>_cont...`)."""
    return [n for n in g if n.startswith((f"{CHAIN.prior}_cont", f"{CHAIN.distilled}_cont"))]


def diagnosis(out: dict, g: dict) -> str:
    """The first link of the chain whose criteria fail (the controls point to it): the
    auto-encoder, the latent sampler, the prior or the distillation."""

    def passes(name: str) -> bool:
        return out[f"{name}_valid_at_1_2"] and out[f"{name}_coverage_at_1_2"]

    # The prior is judged at its most accurate latent sampler (most Euler steps): a few Euler
    # steps of the teacher are expected to fail (that is what the distillation is for).
    priors = [n for n in latent_rows(g) if n.startswith(f"{CHAIN.prior}_")]
    teacher = max(priors, key=lambda n: g[n].get("cont_steps", 0), default=None)
    if not out["oracle_carries_row_at_L"]:
        return "the oracle fails at N_disc = L: the auto-encoder does not carry the row"
    if not out["oracle_parallel_at_1_2"]:
        return (
            "the latent carries the row (oracle at N_disc = L) but the decoder is not confident "
            "enough given it to reveal many tokens at once (oracle at N_disc = 1, 2): the "
            "auto-encoder's decoder"
        )
    if not all(out[f"{n}_valid_at_1_2"] for n in g if n.startswith("exact_prior")):
        return "the oracle works but the exact prior does not: the latent sampler"
    if teacher is not None and not passes(teacher):
        return f"the oracle and the exact prior work but LaDiff does not ({teacher}): the prior"
    if any(not passes(n) for n in latent_rows(g) if n.startswith(f"{CHAIN.distilled}_")):
        return f"LaDiff works ({teacher}) but DiLaDiff does not: the distillation"
    return "every link passes"


def verdict(generators: dict, seq_len: int) -> dict:
    """The issue's pass criteria and, where one fails, the link the controls point to.

    The oracle is judged twice: at N_disc = L (one token at a time: does the latent carry the
    row?) and at N_disc in {1, 2} (are the tokens independent given the latent, so that they
    can be revealed together?). Latent generators cannot beat the oracle at N_disc in {1, 2}."""
    out = criteria(generators, seq_len)
    out["diagnosis"] = diagnosis(out, generators)
    return out


# --------------------------------------------------------------------------- markdown

METRIC_TABLES = (
    ("validity", "Validity (share of rows equal to one of the K)"),
    ("coverage", "Coverage (distinct valid rows / K)"),
    ("tv", "Total variation to uniform over the K"),
    ("token_error", "Token error (Hamming distance to the nearest row / L)"),
)


def _grid_table(result: dict, names: list[str], key: str) -> list[str]:
    """A table of `key` per generator (rows) and N_disc (columns)."""
    grid = result["disc_steps"]
    lines = ["| generator | " + " | ".join(f"N_disc={n}" for n in grid) + " |"]
    lines.append("|---|" + "---|" * len(grid))
    for name in names:
        gen = result["generators"][name]
        lines.append(f"| {name} | " + " | ".join(f"{at(gen, n, key):.3f}" for n in grid) + " |")
    return lines


def _header(result: dict) -> list[str]:
    """The title and the setting in one paragraph."""
    c, pt = result["corpus"], result["perfect_sampler_tv"]
    return [
        "# Parallel-decoding check",
        "",
        f"K = {c['num_sequences']} rows of L = {c['seq_len']} tokens from `{c['origin']}`; "
        f"{result['num_samples']} samples per cell, seed {result['seed']}, "
        f"{result['sampler']}; device {result['device']}; preset `{result['preset']}`. "
        f"A perfect sampler's TV at this sample count: {pt['mean']:.3f} +- {pt['std']:.3f}.",
        "",
    ]


def _oracle_section(result: dict) -> list[str]:
    """The oracles' share of outputs equal to their own row (every generator that has it)."""
    gens = result["generators"]
    names = [n for n, g in gens.items() if "oracle_match" in g["rows"][0]]
    if not names:
        return []
    title = "## Oracle: share of outputs equal to the row whose latent was given"
    return [title, "", *_grid_table(result, names, "oracle_match"), ""]


def _landing_section(result: dict) -> list[str]:
    """Where each prior's samples land among the K latents (latent_landing)."""
    landing = [
        (n, g["latent"])
        for n, g in result["generators"].items()
        if isinstance(g.get("latent"), dict)
    ]
    if not landing:
        return []
    lines = [
        "## Where prior samples land (prior space)",
        "",
        "| generator | nearest-target distance / target spacing (median) | targets nearest | "
        "E||z||^2 / dim (samples) | E||z||^2 / dim (targets) |",
        "|---|---|---|---|---|",
    ]
    for n, l in landing:
        lines.append(
            f"| {n} | {l['nn_ratio_median']:.3f} | {l['targets_nearest']} | "
            f"{l['sq_norm_mean']:.3f} | {l['target_sq_norm_mean']:.3f} |"
        )
    return [*lines, ""]


def markdown(result: dict) -> str:
    """DIR/check.md: the metric tables, the oracles, the prior samples' landing, the verdict."""
    lines = _header(result)
    names = list(result["generators"])
    for key, title in METRIC_TABLES:
        lines += [f"## {title}", "", *_grid_table(result, names, key), ""]
    lines += _oracle_section(result) + _landing_section(result)
    lines += ["## Verdict", ""]
    lines += [f"- {k}: {v}" for k, v in result["verdict"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """DIR/check.png: validity vs N_disc per generator; the controls (given latents) dashed,
    the exact references dotted."""
    from diladiff.plotting import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    grid = result["disc_steps"]
    for name, gen in result["generators"].items():
        control = isinstance(gen.get("latent"), str)
        style = "--" if control else ":" if "exact" in name else "-"
        ax.plot(grid, [at(gen, n) for n in grid], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(grid, [str(n) for n in grid])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("N_disc (decoding steps)")
    ax.set_ylabel("validity")
    c = result["corpus"]
    ax.set_title(
        f"Parallel decoding: K={c['num_sequences']}, L={c['seq_len']}, "
        f"{result['num_samples']} samples per point"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)


def write_results(root: Path, name: str, result: dict) -> None:
    """DIR/NAME.json, .md and .png (not Path.with_suffix: a name "check_topk_t0.5" would lose
    its ".5")."""
    (root / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (root / f"{name}.md").write_text(markdown(result))
    plot(result, root / f"{name}.png")
    print(f"[check] wrote {root / name}.json, .md, .png ({result['seconds']['total_s']:.0f} s)")
