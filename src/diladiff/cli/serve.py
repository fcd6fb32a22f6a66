"""`diladiff serve`: a local web playground that streams generations step by step."""

from __future__ import annotations

from diladiff.cli.options import non_negative


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="a local web playground: watch runs denoise step by step, side by side",
        description="Loads every RUN once and serves a page (no network needed) that streams "
        "each generation step by step: prompt / suffix / [MASK] infilling, N_disc, N_cont, "
        "temperature, top-p, strategy, gamma, seed, a reference text's latent.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders, exported folders or hub ids"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="the address to listen on (anything but localhost exposes the models to the "
        "network, without authentication)",
    )
    p.add_argument("--port", type=non_negative, default=7860, help="the port (0: a free one)")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", choices=["ema", "model"], default="ema")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args) -> int:
    from diladiff.serve import serve

    return serve([str(r) for r in args.runs], args.host, args.port, args.device, args.weights)
