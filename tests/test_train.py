import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diladiff.cli import main
from diladiff.train.checkpoint import latest_checkpoint


def train(run, *extra, preset="tiny"):
    from conftest import TINY

    return main(["train", "mdlm", "--preset", preset, "--run-dir", str(run), *TINY, *extra])


def weights(run, which="model"):
    return load_file(latest_checkpoint(run) / f"{which}.safetensors")


def test_resume_20_plus_20_equals_40_uninterrupted(tmp_path):
    assert train(tmp_path / "a", "train.max_steps=20") == 0
    assert latest_checkpoint(tmp_path / "a").name == "step_00000020"
    assert train(tmp_path / "a", "train.max_steps=40") == 0
    assert train(tmp_path / "b", "train.max_steps=40") == 0
    for which in ("model", "ema"):
        a, b = weights(tmp_path / "a", which), weights(tmp_path / "b", which)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{which}:{k} differs after resume"
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["steps_this_run"] for r in log if r.get("event") == "end"] == [20, 20]
    assert any(r.get("event") == "eval" and r["val_ppl_bound"] > 1 for r in log)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, capsys):
    """SIGTERM during step 13 (a real signal to this process): the step finishes, a checkpoint
    is saved at 13 (ckpt_every is 1000), the CLI exits 143 and says how to resume; resuming to
    40 gives the uninterrupted run's weights."""
    import os
    import signal

    from diladiff.train.trainer import Trainer

    step = Trainer.train_step

    def train_step(self):
        if self.step == 12:  # during the 13th step
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert train(tmp_path / "a", "train.max_steps=40") == 143
    assert "terminated (SIGTERM) at step 13" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "a").name == "step_00000013"
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["event"] == "end" and log[-1]["stopped"] == "sigterm"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.setattr(Trainer, "train_step", step)
    assert train(tmp_path / "a", "train.max_steps=40") == 0
    assert train(tmp_path / "b", "train.max_steps=40") == 0
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_logger_records_what_log_jsonl_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    assert train(run, "train.max_steps=4", "train.log_every=2", "train.logger=tensorboard") == 0
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in log if "loss" in r and "event" not in r]
    got = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in got] == [s for s, _ in losses] == [2, 4]
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(got, losses, strict=True))
    assert "eval/val_loss" in events.Tags()["scalars"]
    assert train(tmp_path / "x", "train.max_steps=1", "train.logger=wandb") == 2
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_run_folder_holds_config_log_and_checkpoints(tmp_path):
    assert train(tmp_path / "r", "train.max_steps=3", "train.lr=1e-3") == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["lr"] == 1e-3 and cfg["preset"] == "tiny"
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["stage"] == "mdlm" and info["tokenizer_identity"]["vocab_size"] == 30522
    assert (tmp_path / "r" / "log.jsonl").is_file()
    assert (tmp_path / "r" / "curve.png").stat().st_size > 0  # the training curve


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "r"
    assert train(run, "train.max_steps=5") == 0
    before = weights(run)
    from diladiff.methods.mdlm.stage import MDLM

    def nan_forward(self, batch, generator):
        loss = self.net.head.bias.sum() * float("nan")
        return loss, {"loss": loss}

    monkeypatch.setattr(MDLM, "forward", nan_forward)
    assert train(run, "train.max_steps=10", "train.ckpt_every=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and len(err.splitlines()) == 1
    assert latest_checkpoint(run).name == "step_00000005"
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unknown_override_key_is_a_one_line_error(tmp_path, capsys):
    assert train(tmp_path / "r", "train.lerning_rate=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'train.lerning_rate'")
    assert len(err.splitlines()) == 1


def test_empty_corpus_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("\n")
    assert train(tmp_path / "r", f"data.source={tmp_path / 'empty.jsonl'}") == 2
    assert "contains no documents" in capsys.readouterr().err


def test_non_utf8_corpus_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\n\xff\xfe broken\n")
    assert train(tmp_path / "r", f"data.source={tmp_path / 'bad.txt'}") == 2
    err = capsys.readouterr().err.strip()
    assert "not valid UTF-8" in err and len(err.splitlines()) == 1


def make_other_tokenizer(folder: Path) -> Path:
    from conftest import word_level_tokenizer

    words = ["[PAD]", "[UNK]", "[SEP]", "[MASK]", "the", "river"]
    return word_level_tokenizer(
        folder, words, unk_token="[UNK]", sep_token="[SEP]", mask_token="[MASK]", pad_token="[PAD]"
    )


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(run, "train.max_steps=2") == 0
    other = make_other_tokenizer(tmp_path / "tok")
    assert train(run, "train.max_steps=4", f"data.tokenizer={other}") == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer vocabulary mismatch" in err and len(err.splitlines()) == 1
    from diladiff.errors import CheckpointError
    from diladiff.runs import load_run

    with pytest.raises(CheckpointError, match="vocabulary mismatch"):
        load_run(run, tokenizer=str(other))


def test_resume_with_another_preset_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(run, "train.max_steps=1") == 0
    assert main(["train", "mdlm", "--preset", "small", "--run-dir", str(run)]) == 2
    assert "created with preset 'tiny'" in capsys.readouterr().err
