"""`diladiff export`: a run as a folder loadable with from_pretrained / the hub."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run as a folder loadable with from_pretrained / the hub"
    )
    p.add_argument("run_dir", type=Path, help="a trained run folder")
    p.add_argument("out_dir", type=Path, help="the folder to write (config, weights, tokenizer)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema", help="(default: ema)")
    p.set_defaults(handler=cmd_export)


def cmd_export(args) -> int:
    from diladiff.hub import export_run

    out = export_run(args.run_dir, args.out_dir, args.weights)
    print(f"wrote {out}: load it with diladiff.load({str(out)!r}) or diladiff sample {out}")
    return 0
