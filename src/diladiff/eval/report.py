"""Turn result files into one Markdown table (protocol and device beside every number).

gen_ppl_ci95 is the bootstrap interval of GenPPL (eval/genppl.py); diversity is per sample,
corpus_diversity pooled over the sample set (eval/diversity.py; empty for older result files);
token_recovery is set for the oracle and noise-latent rows only (eval/oracle.py)."""

from __future__ import annotations

from pathlib import Path

from diladiff.eval.bench import format_table
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
        "token_recovery": m.get("token_recovery", ""),
        "samples": p.get("num_samples", ""),
        "scorer": p.get("scorer", ""),
        "protocol": p.get("version", ""),
        "device": r.get("device", ""),
    }


def markdown_report(paths: list[Path | str], title: str = "Evaluation") -> str:
    rows = [result_row(p) for p in paths]
    return f"# {title}\n\n{format_table(rows, COLUMNS)}\n"
