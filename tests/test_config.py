import pytest

from diladiff.config import Config, ConfigError, build_config


def test_overrides_are_parsed_to_field_types():
    cfg = build_config(
        "tiny",
        [
            "model.depth=7",
            "train.lr=2e-4",
            "model.qk_norm=false",
            "data.source=foo.jsonl",
            "train.total_steps=1e3",
        ],
    )
    assert cfg.model.depth == 7 and isinstance(cfg.model.depth, int)
    assert cfg.train.lr == pytest.approx(2e-4)
    assert cfg.model.qk_norm is False
    assert cfg.data.source == "foo.jsonl"
    assert cfg.train.total_steps == 1000


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*train\.lr"):
        build_config("tiny", ["train.lrr=1"])


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.depth=abc", "expects int"),
        ("model.depth=1.5", "expects int"),
        ("model=3", "is a section"),
        ("model.depth", "key=value"),
    ],
)
def test_bad_overrides_fail_clearly(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config("tiny", [override])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        build_config("huge")


def test_paper_preset_matches_the_paper():
    cfg = build_config("paper")
    assert (cfg.model.depth, cfg.model.width, cfg.model.heads) == (12, 768, 12)
    assert (cfg.data.seq_len, cfg.train.batch_size, cfg.train.lr) == (128, 512, 3e-4)
    assert (cfg.train.warmup_steps, cfg.train.total_steps) == (1000, 1_000_000)
    assert cfg.data.tokenizer == "bert-base-uncased" and cfg.data.source == "openwebtext"


def test_save_load_roundtrip(tmp_path):
    cfg = build_config("small", ["train.lr=1e-3", "sample.strategy=topk"])
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg


def test_config_file_values_apply_before_the_command_line(tmp_path, capsys):
    """--config FILE (TOML nested or JSON dotted): its values, then key=value on top; the
    file's preset unless --preset is given; a run's resolved config.json reproduces itself."""
    import json

    from diladiff.cli import main

    toml = tmp_path / "c.toml"
    toml.write_text('preset = "tiny"\n[train]\nlr = 3e-4\nprogress = false\n[model]\ndepth = 3\n')
    assert main(["config", "--config", str(toml), "model.depth=5"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "tiny" and cfg["train"]["lr"] == 3e-4
    assert cfg["train"]["progress"] is False and cfg["model"]["depth"] == 5
    dotted = tmp_path / "d.json"
    dotted.write_text(json.dumps({"data.seq_len": 48, "sample.top_p": 0.9, "preset": "tiny"}))
    assert main(["config", "--preset", "small", "--config", str(dotted)]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["preset"] == "small" and cfg["data"]["seq_len"] == 48
    assert cfg["sample"]["top_p"] == 0.9
    resolved = build_config("tiny", ["train.lr=1e-3", "meanflow.time_grid=uniform"])
    resolved.save(tmp_path / "config.json")
    assert main(["config", "--config", str(tmp_path / "config.json")]) == 0
    assert json.loads(capsys.readouterr().out) == resolved.to_dict()


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ('{"train": {"lrr": 1}}', "unknown config key 'train.lrr'"),
        ('{"train": {"lr": [1, 2]}}', "train.lr has a list value"),
        ("[1, 2]", "must hold a table"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, match):
    from diladiff.cli import main

    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1


def test_positions_choice_and_its_presets(tmp_path):
    assert build_config("paper").model.positions == "learned"  # the paper's absolute table
    assert build_config("cpu").model.positions == "rope"  # measured (RESULTS.md, issue 26)
    with pytest.raises(ConfigError, match="even head width"):
        build_config("tiny", ["model.positions=rope", "model.width=30", "model.heads=2"])
    with pytest.raises(ConfigError, match="model.positions"):
        build_config("tiny", ["model.positions=alibi"])
    with pytest.raises(ConfigError, match="read the latent alike"):
        build_config("cpu", ["autoencoder.position_embeddings=false"], stage="autoencoder")
    # A run folder written before the key existed loads with the table it was trained with.
    cfg = build_config("cpu").to_dict()
    del cfg["model"]["positions"]
    assert Config.from_dict(cfg).model.positions == "learned"
