"""Every user error is one line `error: ...` on stderr with exit code 2, never a traceback, and
nothing saved is damaged: a table of bad inputs across the commands (empty, missing, wrong type,
out of range, corrupt, wrong run kind, non-UTF-8)."""

import shutil

import pytest
from conftest import TINY

from diladiff.cli import main
from diladiff.train.checkpoint import latest_checkpoint


@pytest.fixture(scope="module")
def files(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (root / "empty.jsonl").write_text("")
    (root / "list.json").write_text("[1, 2]")
    (root / "samples.jsonl").write_text('{"text": "a sentence"}\n')
    corrupt = root / "corrupt"
    shutil.copytree(trained_run, corrupt)
    ema = latest_checkpoint(corrupt) / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:1000])  # truncated
    return {"run": str(trained_run), "root": str(root), "corrupt": str(corrupt)}


CASES = [
    # (argv with {run}/{root}/{corrupt}, words the message must contain)
    (["nonsense"], "invalid choice"),
    (["sample"], "required: run_dir"),
    (["sample", "{run}", "--num-samples", "0"], "integer >= 1"),
    (["sample", "{run}", "--num-samples", "x"], "integer >= 1"),
    (["sample", "{run}", "--disc-steps", "-1"], "integer >= 1"),
    (["sample", "{run}", "--strategy", "magic"], "invalid choice"),
    (["sample", "{run}", "--temperature", "0"], "temperature must be > 0"),
    (["sample", "{run}", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["sample", "{run}", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["sample", "{run}", "--device", "cuda"], "CUDA is not available"),
    (["sample", "{root}/missing"], "not a diladiff run folder"),
    (["sample", "{root}"], "not a diladiff run folder"),
    (["sample", "{corrupt}"], "is damaged"),
    (["sample", "{run}", "--cont-steps", "0"], "integer >= 1"),
    (["sample", "{run}", "unknown.key=1"], "unrecognized arguments"),
    (["bench", "sample", "{run}", "--batch-sizes", "0"], "--batch-sizes values must be >= 1"),
    (["bench", "sample", "{run}", "--batch-sizes", "a,b"], "comma-separated ints"),
    (["eval", "{root}/missing.jsonl"], "does not exist"),
    (["eval", "{root}/binary.txt"], "not UTF-8"),
    (["eval", "{root}/empty.jsonl"], "holds no samples"),
    (["eval", "{root}/list.json"], "needs a 'text' field"),
    (["eval-latent", "{run}"], "needs a latent prior"),
    (["eval-recon", "{root}"], "not a diladiff run folder"),
    (["report", "{root}/missing.json"], "does not exist"),
    (["report", "{root}/binary.txt"], "not a result JSON file"),
    (["report", "{root}/list.json"], "not a result JSON file"),
    (["frontier", "{run}", "--disc-steps", "a", "--out", "{root}/fr"], "comma-separated ints"),
    (["frontier", "{root}/missing", "--out", "{root}/fr2"], "not a diladiff run folder"),
    (["train", "mdlm", "--run-dir", "{root}/t1", "data.source={root}/binary.txt"], "UTF-8"),
    (["train", "mdlm", "--run-dir", "{root}/t2", "data.source={root}/empty.jsonl"], "no documents"),
    (["train", "mdlm", "--run-dir", "{root}/t3", "train.lr=fast"], "expects float"),
    (["train", "mdlm", "--run-dir", "{root}/t4", "train.lrr=1"], "unknown config key"),
    (["train", "mdlm", "--run-dir", "{root}/t5", "--config", "{root}/missing.toml"], "exist"),
    (["train", "ladiff", "--run-dir", "{root}/t6", "--autoencoder", "{run}"], "not of autoencoder"),
    (["train", "mdlm", "--run-dir", "{run}", "--preset", "small"], "preset"),
    (["pipeline", "--run-dir", "{root}/p", "--stages", "nonsense"], "unknown stage"),
    (["prepare-data", "--preset", "tiny", "data.source={root}/missing.jsonl"], "does not exist"),
    (["config", "--preset", "huge"], "invalid choice: 'huge'"),
    (["export", "{root}", "{root}/out"], "not a diladiff run folder"),
    (["export", "{run}", "{root}/binary.txt/out"], "Not a directory"),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a[:3]) for a, _ in CASES])
def test_bad_input_is_one_line_error(files, capsys, argv, words):
    before = latest_checkpoint(files["run"])
    argv = [a.format(**files) for a in argv]
    if argv[:2] == ["train", "mdlm"]:
        argv += ["--preset", "tiny", *TINY] if "--preset" not in argv else []
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors exit from inside main
        code = exc.code
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("Loading weights")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert words in lines[0], err
    assert "Traceback" not in err
    assert latest_checkpoint(files["run"]) == before  # nothing saved is touched
