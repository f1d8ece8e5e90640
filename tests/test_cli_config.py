"""``--config FILE`` + ``key=value`` on eval, export and calibrate (metacot.cli_config), through the real CLIs."""

from __future__ import annotations

import pytest
import yaml


def _resolved(main, argv, capsys) -> dict:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--print-config"])
    assert exc.value.code == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_eval_takes_a_file_then_overrides_then_flags(tmp_path, capsys) -> None:
    from metacot.eval.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model: runs/sft/final\ndata: test.jsonl\nout: runs/eval\nsteps: 8\ncot-source: oracle\n"
                   "cfg: 2.5\nno_cot: true\n")
    got = _resolved(main, ["--config", str(cfg)], capsys)
    assert got["model"] == "runs/sft/final" and got["steps"] == 8 and got["cot_source"] == "oracle"
    assert got["cfg"] == 2.5 and got["no_cot"] is True and got["batch_size"] == 16  # the flag's default
    got = _resolved(main, ["--config", str(cfg), "out=runs/eval-2", "steps=12", "--method", "sft"], capsys)
    assert got["out"] == "runs/eval-2" and got["steps"] == 12 and got["method"] == "sft" and got["data"] == "test.jsonl"
    got = _resolved(main, ["--config", str(cfg), "--steps", "30"], capsys)  # a flag beats the file
    assert got["steps"] == 30


def test_bad_keys_and_values_are_refused_with_what_was_wrong(tmp_path, capsys) -> None:
    from metacot.eval.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("data: test.jsonl\nout: runs/eval\nmodel: m\n")
    assert "unknown key 'stepz'" in _refused(main, ["--config", str(cfg), "stepz=3"], capsys)
    assert "steps: 'many' is not a valid int" in _refused(main, ["--config", str(cfg), "steps=many"], capsys)
    assert "cot_source: 'dataset' is not one of model, oracle, data" in _refused(
        main, ["--config", str(cfg), "cot_source=dataset"], capsys)
    assert "steps is given twice" in _refused(main, ["--config", str(cfg), "--steps", "3", "steps=4"], capsys)
    assert "missing --data" in _refused(main, ["--out", "x", "--model", "m"], capsys)
    assert "no such file" in _refused(main, ["--config", str(tmp_path / "nope.yaml")], capsys)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    assert "must hold a mapping" in _refused(main, ["--config", str(tmp_path / "list.yaml")], capsys)
    assert "takes true or false" in _refused(main, ["--config", str(cfg), "no_cot=maybe"], capsys)


def test_export_keeps_its_run_argument_and_its_lora_choice(tmp_path, capsys) -> None:
    from metacot.export.cli import main

    cfg = tmp_path / "export.yaml"
    cfg.write_text("out: exports/a\ndtype: fp32\nkeep_lora: true\n")
    got = _resolved(main, ["runs/sft", "--config", str(cfg)], capsys)
    assert got == {"run": "runs/sft", "out": "exports/a", "dtype": "fp32", "keep_lora": True, "step": None,
                   "check_against": None, "overwrite": False}
    got = _resolved(main, ["--config", str(cfg), "runs/sft", "step=200", "--merge-lora"], capsys)
    assert got["step"] == 200 and got["keep_lora"] is False and got["run"] == "runs/sft"
    assert "not one of bf16, fp32" in _refused(main, ["runs/sft", "--config", str(cfg), "dtype=fp16"], capsys)


def test_calibrate_keeps_its_exclusive_sources(tmp_path, capsys) -> None:
    from rewards.calibration import calibrate_main

    cfg = tmp_path / "cal.yaml"
    cfg.write_text("labels: labels.jsonl\nout: cal\nscores: [a.jsonl, b.jsonl]\njudge_model: judge\n")
    got = _resolved(calibrate_main, ["--config", str(cfg)], capsys)
    assert got["scores"] == ["a.jsonl", "b.jsonl"] and got["min_r"] == 0.8 and got["server"] is None
    got = _resolved(calibrate_main, ["--config", str(cfg), "scores=c.jsonl", "min_r=0.9"], capsys)
    assert got["scores"] == ["c.jsonl"] and got["min_r"] == 0.9
    assert "only one of --scores / --server" in _refused(
        calibrate_main, ["--config", str(cfg), "--server", "http://127.0.0.1:1"], capsys)
    assert "one of --scores / --server is required" in _refused(
        calibrate_main, ["--labels", "l.jsonl", "--out", "o"], capsys)
