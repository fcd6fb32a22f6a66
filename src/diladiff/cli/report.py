"""`diladiff report`: a Markdown table of result JSON files."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="Markdown table of result JSON files")
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--out", type=Path)
    p.add_argument("--title", default="Evaluation")
    p.set_defaults(handler=cmd_report)


def cmd_report(args) -> int:
    from diladiff.eval.report import markdown_report

    text = markdown_report(args.results, args.title)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0
