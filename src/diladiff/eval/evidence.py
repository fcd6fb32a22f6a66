"""The real-text evidence table: does the latent buy few-step quality on text?

Read from the pipeline's result files (DIR/eval/NAME.json, protocol v2), for each unmasking
strategy s and each N_disc n of the plan:

    baseline   mdlm_{s}_disc{n}
    latent     ladiff_{s}_cont200_disc{n}, diladiff_{s}_cont5_disc{n}
    controls   oracle_{s}_disc{n} (the row's own encoder latent), other_row_latent_{s}_disc{n}
               (another held-out row's), noise_latent_{s}_disc{n} (z ~ N(0, I))

Each latent row is compared with the MDLM row of the same (s, n) on the word n-gram perplexity
of its samples (eval/ngram.py) by the paired bootstrap (eval/paired.py: sample i of both from
the same seed and index): the difference A - MDLM and its 95% interval. A "win" needs the
interval below 0 and no low-entropy shortcut: the unigram entropy of the token ids and the
word distinct-2 within `tolerance` (5%) of the MDLM's. The paper's headline is tested the same
way: LaDiff at N_disc = L/8 against the MDLM at N_disc = L. DiLaDiff is held to its teacher:
its n-gram perplexity within 10% of LaDiff-200's at N_disc = 8.

When the latent rows lose, the controls say which link fails: oracle ~ other-row ~ noise means
the decoder ignores the latent; oracle good but LaDiff near noise means the prior misses the
encoder's distribution; LaDiff good but DiLaDiff not means the distillation.
"""

from __future__ import annotations

import math
from pathlib import Path

from diladiff.eval.paired import compare_results
from diladiff.eval.protocol import read_result

LATENT_ROWS = {"ladiff": "ladiff_{s}_cont200_disc{n}", "diladiff": "diladiff_{s}_cont5_disc{n}"}
CONTROL_ROWS = ("oracle", "other_row_latent", "noise_latent")
# Entropy and distinct-2 within this share of the MDLM's for a win to count.
DIVERSITY_TOLERANCE = 0.05
# DiLaDiff-5's n-gram perplexity within this share of LaDiff-200's at N_disc = 8.
STUDENT_TOLERANCE = 0.10


def _relative(a: float | None, b: float | None) -> float | None:
    """(a - b) / b, or None when either is missing."""
    if a is None or b is None or not b:
        return None
    return (a - b) / b


def paired_ngram(a: dict, b: dict) -> dict:
    """The paired n-gram perplexity difference a - b (compare_results' ngram_ppl row)."""
    row = next(r for r in compare_results(a, b) if r["metric"] == "ngram_ppl")
    return {k: row[k] for k in ("a", "b", "diff", "ci95", "log_ratio_ci95", "excludes_zero")}


def judge_win(latent: dict, mdlm: dict, tolerance: float = DIVERSITY_TOLERANCE) -> dict:
    """A latent row against the MDLM row: paired n-gram perplexity difference, the relative
    entropy and distinct-2 differences, and `win` = the interval lies below 0 and both
    diversity measures are within `tolerance` of the MDLM's."""
    cmp = paired_ngram(latent, mdlm)
    ml, mm = latent["metrics"], mdlm["metrics"]
    ent = _relative(ml.get("entropy"), mm.get("entropy"))
    d2 = _relative(ml.get("distinct_2"), mm.get("distinct_2"))
    diverse = all(x is not None and abs(x) <= tolerance for x in (ent, d2))
    below = cmp["excludes_zero"] and cmp["ci95"][1] < 0
    return {**cmp, "entropy_rel": ent, "distinct_2_rel": d2, "diverse": diverse,
            "win": bool(below and diverse)}  # fmt: skip


def evidence(eval_dir: Path, strategies: list[str], disc: list[int], seq_len: int) -> dict:
    """The evidence record from DIR/eval (module docstring); rows whose files are missing are
    left out and listed under `missing`."""
    eval_dir = Path(eval_dir)
    cache: dict[str, dict | None] = {}

    def load(name: str) -> dict | None:
        if name not in cache:
            path = eval_dir / f"{name}.json"
            cache[name] = read_result(path) if path.is_file() else None
        return cache[name]

    cells, missing, criteria = [], [], {}
    for s in strategies:
        for n in disc:
            mdlm = load(f"mdlm_{s}_disc{n}")
            if mdlm is None:
                missing.append(f"mdlm_{s}_disc{n}")
                continue
            cell = {"strategy": s, "disc_steps": n, "mdlm": _summary(mdlm)}
            for kind, pattern in LATENT_ROWS.items():
                res = load(pattern.format(s=s, n=n))
                if res is None:
                    missing.append(pattern.format(s=s, n=n))
                    continue
                cell[kind] = {**_summary(res), **judge_win(res, mdlm)}
            for control in CONTROL_ROWS:
                res = load(f"{control}_{s}_disc{n}")
                if res is not None:
                    cell[control] = _summary(res)
            cells.append(cell)
        # The paper's headline: LaDiff at L/8 against the MDLM at L.
        mdlm_full, ladiff_8 = load(f"mdlm_{s}_disc{seq_len}"), None
        if seq_len // 8 in disc:
            ladiff_8 = load(LATENT_ROWS["ladiff"].format(s=s, n=seq_len // 8))
        if mdlm_full is not None and ladiff_8 is not None:
            criteria[f"headline_{s}"] = judge_win(ladiff_8, mdlm_full)
        # The student against its teacher at N_disc = 8.
        teacher = load(LATENT_ROWS["ladiff"].format(s=s, n=8))
        student = load(LATENT_ROWS["diladiff"].format(s=s, n=8))
        if teacher is not None and student is not None:
            rel = _relative(
                student["metrics"].get("ngram_ppl"), teacher["metrics"].get("ngram_ppl")
            )
            criteria[f"student_vs_teacher_{s}_disc8"] = {
                "relative": rel,
                "within": rel is not None and rel <= STUDENT_TOLERANCE,
            }
    for kind in LATENT_ROWS:
        few = [c for c in cells if c["disc_steps"] in (1, 2, 4)]  # a missing row is no win
        wins = [c for c in few if c.get(kind, {}).get("win")]
        criteria[f"{kind}_beats_mdlm_at_1_2_4"] = {
            "cells": [f"{c['strategy']}@{c['disc_steps']}" for c in wins],
            "all": bool(few) and len(wins) == len(few),
        }
    return {
        "strategies": strategies,
        "disc_steps": disc,
        "seq_len": seq_len,
        "cells": cells,
        "criteria": criteria,
        "diagnosis": diagnose(cells),
        "missing": missing,
    }


def _summary(result: dict) -> dict:
    m = result["metrics"]
    keys = ("ngram_ppl", "ngram_ppl_ci95", "entropy", "distinct_2", "seen_bigrams", "copy_span")
    out = {k: m.get(k) for k in keys}
    if "gen_ppl" in m:
        out["gen_ppl"], out["gen_ppl_ci95"] = m["gen_ppl"], m.get("gen_ppl_ci95")
    if "token_recovery" in m:
        out["token_recovery"] = m["token_recovery"]
    return out


def diagnose(cells: list[dict]) -> str:
    """Which link of the chain fails, from the controls' token recovery and the n-gram
    perplexities at the fewest decoding steps measured (module docstring)."""
    with_controls = [c for c in cells if "oracle" in c and "other_row_latent" in c]
    if not with_controls:
        return "no controls measured"
    cell = min(with_controls, key=lambda c: c["disc_steps"])
    own = cell["oracle"].get("token_recovery") or 0.0
    other = cell["other_row_latent"].get("token_recovery") or 0.0
    if own < other + 0.10:
        return (
            f"the decoder ignores the latent (recovery {own:.3f} with the row's own latent vs "
            f"{other:.3f} with another row's, N_disc = {cell['disc_steps']})"
        )
    ppl = {k: (cell.get(k) or {}).get("ngram_ppl") for k in ("ladiff", "diladiff", "oracle")}
    noise = cell.get("noise_latent", {}).get("ngram_ppl")
    if ppl["ladiff"] is not None and noise is not None and ppl["oracle"] is not None:
        gap = noise - ppl["oracle"]
        if gap > 0 and ppl["ladiff"] > ppl["oracle"] + 0.5 * gap:
            return "the prior misses the encoder's distribution (LaDiff nearer noise than oracle)"
    if ppl["ladiff"] and ppl["diladiff"] and ppl["diladiff"] > ppl["ladiff"] * 1.1:
        return "the distillation loses what the teacher has"
    return "every link carries the latent"


def _fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}f}"


def evidence_markdown(ev: dict) -> str:
    """The evidence record as Markdown: one table per strategy, then the criteria."""
    lines = ["## Real-text evidence (word n-gram perplexity of samples, paired vs the MDLM)", ""]
    lines.append(
        "ngram_ppl: Kneser-Ney order-3 word LM fitted on the training split; diff: paired "
        "bootstrap of A - MDLM at the same (strategy, N_disc), 95% interval; win: interval "
        f"below 0 with entropy and distinct-2 within {DIVERSITY_TOLERANCE:.0%} of the MDLM's. "
        "recovery: share of positions equal to the held-out row (controls)."
    )
    for s in ev["strategies"]:
        lines += ["", f"### {s}", ""]
        lines.append("| N_disc | row | ngram_ppl [95%] | diff vs MDLM [95%] | win | entropy Δ | "
                     "distinct-2 Δ | seen bigrams | recovery |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for c in (c for c in ev["cells"] if c["strategy"] == s):
            for row in ("mdlm", "ladiff", "diladiff", *CONTROL_ROWS):
                r = c.get(row)
                if r is None:
                    continue
                ci = r.get("ngram_ppl_ci95") or [None, None]
                diff = ""
                if "diff" in r:
                    diff = f"{_fmt(r['diff'])} [{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}]"
                lines.append(
                    f"| {c['disc_steps']} | {row} | {_fmt(r['ngram_ppl'])} [{_fmt(ci[0])}, "
                    f"{_fmt(ci[1])}] | {diff} | {'yes' if r.get('win') else ''} | "
                    f"{_fmt(100 * r['entropy_rel'], 1) + '%' if r.get('entropy_rel') is not None else ''} | "  # noqa: E501
                    f"{_fmt(100 * r['distinct_2_rel'], 1) + '%' if r.get('distinct_2_rel') is not None else ''} | "  # noqa: E501
                    f"{_fmt(r.get('seen_bigrams'), 3)} | {_fmt(r.get('token_recovery'), 3)} |"
                )
    lines += ["", "### Criteria", ""]
    for name, crit in ev["criteria"].items():
        if "win" in crit:
            verdict = "yes" if crit["win"] else "no"
            lines.append(
                f"- {name}: {verdict} (diff {_fmt(crit['diff'])} [{_fmt(crit['ci95'][0])}, "
                f"{_fmt(crit['ci95'][1])}])"
            )
        elif "within" in crit:
            rel = crit["relative"]
            lines.append(
                f"- {name}: {'yes' if crit['within'] else 'no'} ({_fmt(100 * rel) if rel is not None else '?'}%)"  # noqa: E501
            )
        else:
            lines.append(f"- {name}: {'yes' if crit['all'] else 'no'} (wins: {crit['cells']})")
    lines += [f"- diagnosis: {ev['diagnosis']}", ""]
    if ev["missing"]:
        lines += [f"Missing rows: {', '.join(ev['missing'])}", ""]
    return "\n".join(lines)
