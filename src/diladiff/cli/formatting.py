"""Help texts: the defaults-showing formatter and the help of options many commands share."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; every option's help ends with its default, unless the help
    already says what the default is or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


# Help for the options that many commands share (any option left without help gets it here).
COMMON_HELP = {
    "run_dir": "a run folder (or, where a model is loaded, an exported folder or hub id)",
    "device": "auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...",
    "seed": "random seed (the same seed gives the same samples)",
    "weights": "which weights of the newest checkpoint: the EMA average or the raw model",
    "json": "also write the result as JSON here",
    "out": "where to write the output",
    "strategy": "which masked positions each step reveals (ancestral, topk, ...)",
    "temperature": "divides the logits before every token draw",
    "top_p": "nucleus sampling: keep the smallest set of tokens with this probability mass",
    "num_samples": "how many rows to generate",
    "batch_size": "rows per forward pass",
    "batch_sizes": "comma-separated batch sizes to time",
    "repeats": "timed batches per batch size (after one warm-up batch)",
    "mauve_seed": "seed of MAUVE's k-means quantisation",
    "results": "result JSON files (from eval --json, eval-recon --json, ...)",
    "title": "the Markdown table's heading",
    "disc_steps": "comma-separated N_disc values to sweep",
    "scorer": "causal LM for GenPPL and MAUVE features: hub name, path or smollm2-135m",
    "no_mauve": "skip MAUVE (no reference texts needed)",
    "preset": "tiny (tests, demo), cpu (real-text evidence on 2 cores), small or paper "
    "(optionally with -4x: 4x latent compression)",
    "run_dirs": "run folders to sweep",
    "samples": "a samples JSONL file",
    "stage": "the stage to train",
    "model": "hub name, path or alias of the feature model",
    "out_dir": "the folder to write",
    "dtype": "floating-point format of the written weights",
}


def document_options(parser: argparse.ArgumentParser) -> None:
    """Give every option of every (sub)command a help text (COMMON_HELP by destination) and
    the defaults-showing formatter."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                document_options(sub)
        elif action.help is None and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]
