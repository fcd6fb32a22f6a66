"""`diladiff prepare-data` and `diladiff export-features`: the packed corpus and a local copy
of a feature model."""

from __future__ import annotations

from pathlib import Path

from diladiff.cli.options import preset_choices


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare-data",
        help="tokenise and pack a preset's corpus into the cache (or data.cache_dir); prints "
        "the packed folder, usable as data.source without the corpus",
    )
    p.add_argument("--preset", default="paper", choices=preset_choices())
    p.epilog = "Further key=value arguments are config overrides (data.*)."
    p.set_defaults(handler=cmd_prepare_data)

    p = sub.add_parser(
        "export-features",
        help="save a feature model and its tokenizer as a local safetensors folder",
    )
    p.add_argument("model", help="hub name, path or alias (e.g. minilm-l6, bert-base-uncased)")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.set_defaults(handler=cmd_export_features)


def cmd_prepare_data(args) -> int:
    from diladiff.config import build_config
    from diladiff.data.packing import prepare_data
    from diladiff.data.tokenizer import load_tokenizer

    cfg = build_config(args.preset, args.overrides).data
    data = prepare_data(cfg, load_tokenizer(cfg))  # a corpus BPE (bpe-N) is trained first
    m = data.manifest
    copy = data.folder / "tokenizer"  # packed with the rows (not by older versions)
    print(
        f"{data.folder}\n{m['train_rows']} train rows, {m['val_rows']} held-out rows of "
        f"{m['seq_len']} tokens from {m['source']!r}, tokenizer {cfg.tokenizer}"
        + (f" (copy in {copy})" if copy.is_dir() else "")
        + f"; use it anywhere as data.source={data.folder}"
    )
    return 0


def cmd_export_features(args) -> int:
    from diladiff.features import export_feature_model

    out = export_feature_model(args.model, args.out_dir, args.dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {out} ({size / 2**20:.1f} MiB); use autoencoder.feature_model={out} "
        f"data.tokenizer={out}"
    )
    return 0
