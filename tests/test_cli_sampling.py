import json

from diladiff.cli import main


def test_sample_writes_jsonl_with_ids_and_text(trained_run, tmp_path):
    out = tmp_path / "s.jsonl"
    assert (
        main(
            [
                "sample",
                str(trained_run),
                "--num-samples",
                "3",
                "--disc-steps",
                "8",
                "--seed",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3
    assert all(len(r["ids"]) == 32 and 103 not in r["ids"] and r["text"] for r in rows)
    again = tmp_path / "t.jsonl"
    main(
        [
            "sample",
            str(trained_run),
            "--num-samples",
            "3",
            "--disc-steps",
            "8",
            "--seed",
            "1",
            "--out",
            str(again),
        ]
    )
    assert again.read_text() == out.read_text()  # seeded


def test_sample_prints_to_stdout_with_topk(trained_run, capsys):
    assert (
        main(
            [
                "sample",
                str(trained_run),
                "--num-samples",
                "2",
                "--disc-steps",
                "4",
                "--strategy",
                "topk",
                "--temperature",
                "0.8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("--- sample") == 2


def test_bench_prints_a_table(trained_run, capsys, tmp_path):
    assert (
        main(
            [
                "bench",
                "sample",
                str(trained_run),
                "--batch-sizes",
                "1,2",
                "--repeats",
                "1",
                "--disc-steps",
                "4",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| batch | wall_s_per_batch | tokens_per_s |" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["tokens_per_s"] > 0 for r in rows)


def test_sample_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["sample", str(tmp_path)]) == 2
    assert "not a diladiff run folder" in capsys.readouterr().err
