"""Turn result files into one Markdown table (protocol and device beside every number).

gen_ppl_ci95 is the bootstrap interval of GenPPL (eval/genppl.py); diversity is per sample,
corpus_diversity pooled over the sample set (eval/diversity.py; empty for older result files);
token_recovery is set for the oracle and noise-latent rows only (eval/oracle.py). The word
metrics (eval/ngram.py, protocol v2; empty for older files or without a training run):
ngram_ppl (Kneser-Ney word LM fitted on the train split) and its bootstrap interval,
seen_bigrams / seen_trigrams (share of the samples' word n-grams found in the training text),
distinct_1..3 on words, copy_span (mean longest run of words copied verbatim from one training
document) and copy_share (that run / sample words). `comparison_table`: the paired intervals
of A - B (eval/paired.py)."""

from __future__ import annotations

from pathlib import Path

from diladiff.eval.bench import format_table
from diladiff.eval.paired import compare_results
from diladiff.eval.protocol import read_result

COLUMNS = [
    "result",
    "stage",
    "N_disc",
    "strategy",
    "T",
    "gen_ppl",
    "gen_ppl_ci95",
    "gen_ppl_median",
    "entropy",
    "diversity",
    "corpus_diversity",
    "mauve",
    "ngram_ppl",
    "ngram_ppl_ci95",
    "seen_bigrams",
    "seen_trigrams",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "copy_span",
    "copy_share",
    "token_recovery",
    "samples",
    "scorer",
    "protocol",
    "device",
]


def _num(v: float) -> str:
    return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def format_interval(ci) -> str:
    """[lo, hi] as printed in tables ("" when the result has none, e.g. an older file)."""
    return f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else ""


def result_row(path: Path | str) -> dict:
    r = read_result(path)
    m, g, p = r.get("metrics", {}), r.get("generator", {}), r.get("protocol", {})
    return {
        "result": Path(path).stem,
        "stage": g.get("stage", ""),
        "N_disc": g.get("disc_steps", ""),
        "strategy": g.get("strategy", ""),
        "T": g.get("temperature", ""),
        "gen_ppl": m.get("gen_ppl", ""),
        "gen_ppl_ci95": format_interval(m.get("gen_ppl_ci95")),
        "gen_ppl_median": m.get("gen_ppl_median", ""),
        "entropy": m.get("entropy", ""),
        "diversity": m.get("diversity", ""),
        "corpus_diversity": m.get("corpus_diversity", ""),
        "mauve": m.get("mauve", ""),
        "ngram_ppl": m.get("ngram_ppl", ""),
        "ngram_ppl_ci95": format_interval(m.get("ngram_ppl_ci95")),
        **{k: m.get(k, "") for k in ("seen_bigrams", "seen_trigrams")},
        **{f"distinct_{n}": m.get(f"distinct_{n}", "") for n in (1, 2, 3)},
        "copy_span": m.get("copy_span", ""),
        "copy_share": m.get("copy_share", ""),
        "token_recovery": m.get("token_recovery", ""),
        "samples": p.get("num_samples", ""),
        "scorer": p.get("scorer", ""),
        "protocol": p.get("version", ""),
        "device": r.get("device", ""),
    }


def markdown_report(paths: list[Path | str], title: str = "Evaluation") -> str:
    rows = [result_row(p) for p in paths]
    return f"# {title}\n\n{format_table(rows, COLUMNS)}\n"


def comparison_table(path_a: Path | str, path_b: Path | str) -> str:
    """Markdown table of the paired differences A - B of two result files of the same seeds
    (eval/paired.py `compare_results`): each metric's A, B, difference, 95% interval, and
    whether the interval excludes 0."""
    rows = compare_results(read_result(path_a), read_result(path_b))
    table = [
        {
            "metric": r["metric"],
            "A": r["a"],
            "B": r["b"],
            "A - B": r["diff"],
            "ci95": format_interval(r["ci95"]),
            "ln(A/B) ci95": format_interval(r.get("log_ratio_ci95")),
            "excludes 0": "yes" if r["excludes_zero"] else "no",
        }
        for r in rows
    ]
    title = f"# Paired comparison: A = {Path(path_a).stem}, B = {Path(path_b).stem}"
    return f"{title}\n\n{format_table(table)}\n"
