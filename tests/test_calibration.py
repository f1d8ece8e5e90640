"""Calibration statistics against hand-computed values, input validation, the report, the CLI and the gate.

Expected numbers were worked out by hand (shown in the comments), not recomputed with numpy or scipy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from rewards.calibration import (
    CalibrationError,
    annotator_agreement,
    average_ranks,
    bootstrap_intervals,
    calibrate,
    calibrate_main,
    find_passing_calibration,
    load_scores,
    mean_abs_error,
    pearson,
    spearman,
)
from rewards.labeling import LabelError, load_labels

HUMAN = list(range(10))                                   # 0..9, mean 4.5, sum of squared deviations 82.5
NOISE = [1, -1, 1, -1, 1, -1, 1, -1, 1, -1]
GOOD = [h + e for h, e in zip(HUMAN, NOISE)]               # [1,0,3,2,5,4,7,6,9,8]
INVERTED = [9 - h for h in HUMAN]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _labels(tmp_path: Path, simulated: bool = False) -> Path:
    rows = [{"id": f"s{k}", "human_score": h, "category": "add" if k < 5 else "remove",
             **({"simulated": True} if simulated else {})} for k, h in enumerate(HUMAN)]
    return _write_jsonl(tmp_path / "labels.jsonl", rows)


def _scores(tmp_path: Path, name: str, prompt: str, values: list[float | None], extra: dict | None = None) -> Path:
    rows = [{"id": f"s{k}", "score": v, "prompt": prompt} for k, v in enumerate(values)]
    rows += [{"id": sid, "score": v, "prompt": prompt} for sid, v in (extra or {}).items()]
    return _write_jsonl(tmp_path / name, rows)


# -- statistics ---------------------------------------------------------------------------------------------------
def test_statistics_match_hand_computation() -> None:
    # h = [1..5], j = [2,1,4,3,5]: deviations (-2,-1,0,1,2) and (-1,-2,1,0,2); products sum 8; squares 10 and 10.
    assert pearson([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert mean_abs_error([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # (1+1+1+1+0)/5
    # Ties: ranks of [1,2,2,10] are [1,2.5,2.5,4]; of [1,3,2,4] are [1,3,2,4]. Rank deviations (-1.5,0,0,1.5) and
    # (-1.5,.5,-.5,1.5): products 4.5, squares 4.5 and 5 -> rho = 4.5/sqrt(22.5) = 3/sqrt(10) = 0.948683.
    assert list(average_ranks([1, 2, 2, 10])) == [1.0, 2.5, 2.5, 4.0]
    assert list(average_ranks([5, 1, 5])) == [2.5, 1.0, 2.5]
    assert spearman([1, 2, 2, 10], [1, 3, 2, 4]) == pytest.approx(0.948683, abs=1e-6)
    # Raw Pearson: mean 3.75, deviations (-2.75,-1.75,-1.75,6.25); products 13.5; squares 52.75 and 5
    # -> 13.5/sqrt(263.75) = 0.831261.
    assert pearson([1, 2, 2, 10], [1, 3, 2, 4]) == pytest.approx(0.831261, abs=1e-6)
    # The 10-sample fixture: sum dh^2 = 82.5, sum dh*e = 0-1+2-3+4-5+6-7+8-9 = -5, sum e^2 = 10
    # -> r = (82.5-5)/sqrt(82.5*(82.5-10+10)) = 77.5/82.5 = 0.939394.
    assert pearson(HUMAN, GOOD) == pytest.approx(0.939394, abs=1e-6)
    assert pearson(HUMAN, INVERTED) == pytest.approx(-1.0)
    assert pearson(HUMAN, [5] * 10) is None and spearman([5] * 10, HUMAN) is None


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    a = bootstrap_intervals(HUMAN, GOOD)
    assert a == bootstrap_intervals(HUMAN, GOOD)
    lo, hi = a["pearson_r"]
    assert lo < 0.939394 < hi <= 1.0
    assert a["mae"] == [1.0, 1.0]  # every |error| is 1, so every resample's MAE is 1
    assert bootstrap_intervals(HUMAN, [5] * 10)["pearson_r"] is None  # constant judge: r never defined


def test_annotator_agreement_by_hand(tmp_path: Path) -> None:
    rows = [{"id": "x", "human_score": 1, "annotator": "a"}, {"id": "x", "human_score": 2, "annotator": "b"},
            {"id": "y", "human_score": 2, "annotator": "a"}, {"id": "y", "human_score": 2, "annotator": "b"},
            {"id": "z", "human_score": [3, 4]}]
    # z's list scores are anonymous annotators #1/#2, so a and b share x, y only (< 3 -> no r for them).
    items = load_labels(_write_jsonl(tmp_path / "l.jsonl", rows))
    assert items["x"].human_score == pytest.approx(1.5) and items["z"].human_score == pytest.approx(3.5)
    agreement = annotator_agreement(list(items.values()))
    assert agreement["mean_pairwise_pearson_r"] is None
    assert agreement["mean_pairwise_abs_diff"] == pytest.approx(2 / 3)  # |1-2|, |2-2|, |3-4|
    assert agreement["mean_sample_std"] == pytest.approx(1 / 3)  # 0.5, 0, 0.5
    # a=[1,2,3], b=[2,2,4]: deviations (-1,0,1), (-2/3,-2/3,4/3); products 2; squares 2, 8/3 -> sqrt(3)/2.
    rows = [{"id": i, "human_score": s, "annotator": a} for a, ss in (("a", [1, 2, 3]), ("b", [2, 2, 4]))
            for i, s in zip("pqr", ss)]
    agreement = annotator_agreement(list(load_labels(_write_jsonl(tmp_path / "m.jsonl", rows)).values()))
    assert agreement["mean_pairwise_pearson_r"] == pytest.approx(math.sqrt(3) / 2)


# -- the report ---------------------------------------------------------------------------------------------------
def test_report_merges_files_picks_best_and_counts_exclusions(tmp_path: Path) -> None:
    labels = load_labels(_labels(tmp_path))
    # The good variant is split over two files, as two shards of a SLURM array would write it.
    files = [_scores(tmp_path, "a.jsonl", "good", GOOD[:6]),
             _write_jsonl(tmp_path / "b.jsonl", [{"id": f"s{k}", "score": GOOD[k], "prompt": "good"}
                                                  for k in range(6, 10)] + [{"id": "zz", "score": 3,
                                                                             "prompt": "good"}]),
             _scores(tmp_path, "c.jsonl", "inverted", INVERTED),
             _scores(tmp_path, "d.jsonl", "constant", [5] * 10)]
    report = calibrate(labels, load_scores(files)[0], judge_model="tiny-judge")
    assert report["passed"] and report["best_prompt"] == "good" and report["n"] == 10
    assert report["pearson_r"] == pytest.approx(0.939394, abs=1e-6) and report["mae"] == pytest.approx(1.0)
    by = {v["prompt"]: v for v in report["variants"]}
    assert by["good"]["excluded"]["scores_without_label"] == 1
    assert by["good"]["excluded"]["scores_without_label_ids"] == ["zz"]
    assert not by["inverted"]["passed"] and by["inverted"]["mae"] == pytest.approx(5.0)  # mean |2h-9|
    assert "Pearson r -1.000 < 0.8" in by["inverted"]["reason"] and "MAE 5.000 > 2.5" in by["inverted"]["reason"]
    assert not by["constant"]["passed"] and "undefined" in by["constant"]["reason"]
    assert by["constant"]["mae"] == pytest.approx(2.5)  # (5+4+3+2+1+0+1+2+3+4)/10
    # Per category add = s0..s4: human [0..4], judge [1,0,3,2,5] (mean 2.2); |e| = 1 each.
    # r: dh (-2,-1,0,1,2), dj (-1.2,-2.2,.8,-.2,2.8): products 10, squares 10 and 14.8 -> 10/sqrt(148) = 0.821995.
    # rho: judge ranks [2,1,4,3,5] against [1..5] -> the first fixture above, 0.8.
    assert by["good"]["per_category"]["add"] == {"n": 5, "pearson_r": pytest.approx(0.821995, abs=1e-6),
                                                 "spearman_rho": pytest.approx(0.8), "mae": pytest.approx(1.0)}
    assert report["simulated"] is False and report["annotator_agreement"] is None


def test_no_variant_passes_reports_highest_r(tmp_path: Path) -> None:
    labels = load_labels(_labels(tmp_path))
    # One null score and one missing: n = 8 < 10 and coverage 0.8 < 0.9 although r is high.
    partial = _scores(tmp_path, "p.jsonl", "partial", GOOD[:8] + [None])
    report = calibrate(labels, load_scores([partial, _scores(tmp_path, "i.jsonl", "inv", INVERTED)])[0],
                       judge_model="m")
    assert not report["passed"] and report["best_prompt"] == "partial"
    v = report["variants"][[x["prompt"] for x in report["variants"]].index("partial")]
    assert v["excluded"] == {"scores_without_label": 0, "scores_without_label_ids": [], "labels_without_score": 1,
                             "unscored": 1}
    assert "only 8 scored labelled samples" in v["reason"] and "coverage 0.80" in v["reason"]


@pytest.mark.parametrize("rows, message", [
    ([{"id": "s0", "score": float("nan")}], "must be a number in 0-10"),
    ([{"id": "s0", "score": 10.5}], "must be a number in 0-10"),
    ([{"id": "s0", "score": "7"}], "must be a number in 0-10"),
    ([{"id": "s0"}], "must be a number in 0-10"),
    ([{"score": 3}], "needs an 'id'"),
    ([{"id": "s0", "score": 3}, {"id": "s0", "score": 4}], "duplicate score for id 's0'"),
])
def test_bad_scores_are_refused_with_file_and_line(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = _write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(CalibrationError, match=message) as err:
        load_scores([path])
    assert f"{path}:" in str(err.value)


def test_duplicates_across_score_files_are_refused(tmp_path: Path) -> None:
    a = _scores(tmp_path, "a.jsonl", "v1", [1, 2])
    with pytest.raises(CalibrationError, match=r"duplicate score for id 's1', prompt 'v1' \(first at .*a.jsonl:2\)"):
        load_scores([a, _scores(tmp_path, "b.jsonl", "v1", [None, 3])])


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "human_score": 11}], "must be a number in 0-10"),
    ([{"id": "a", "human_score": None}], "must be a number in 0-10"),
    ([{"id": "a", "human_score": [3, "x"]}], "list must hold numbers"),
    ([{"id": "a", "human_score": [3, 4], "annotator": "bo"}], "drop 'annotator'"),
    ([{"id": "a", "human_score": 3}, {"id": "a", "human_score": 4}], "duplicate label for id 'a'"),
    ([{"id": "a", "human_score": 3, "annotator": "bo"}, {"id": "a", "human_score": 4, "annotator": "bo"}],
     "by annotator 'bo'"),
    ([{"id": "a", "human_score": 3, "annotator": "bo", "category": "add"},
      {"id": "a", "human_score": 4, "annotator": "al", "category": "remove"}], "category 'remove' differs"),
    ([{"human_score": 3}], "'id' must be"),
])
def test_bad_labels_are_refused_with_file_and_line(tmp_path: Path, rows: list[dict], message: str) -> None:
    path = _write_jsonl(tmp_path / "l.jsonl", rows)
    with pytest.raises(LabelError, match=message) as err:
        load_labels(path)
    assert f"{path}:" in str(err.value)


def test_scores_matching_no_label_are_an_error(tmp_path: Path) -> None:
    labels = load_labels(_labels(tmp_path))
    scores, _ = load_scores([_write_jsonl(tmp_path / "s.jsonl", [{"id": "other", "score": 2}])])
    with pytest.raises(CalibrationError, match="no score id matches a label id"):
        calibrate(labels, scores, judge_model="m")


# -- CLI and gate -------------------------------------------------------------------------------------------------
def test_cli_exit_codes_report_files_and_gate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = _labels(tmp_path)
    good = _scores(tmp_path, "good.jsonl", "cec_v1", GOOD)
    bad = _scores(tmp_path, "bad.jsonl", "cec_v2", INVERTED)
    out = tmp_path / "calib"
    assert calibrate_main(["--labels", str(labels), "--scores", str(good), str(bad), "--out", str(out),
                           "--judge-model", "tiny-judge"]) == 0
    report = json.loads((out / "calibration.json").read_text())
    for key in ("pearson_r", "spearman_rho", "mae", "n", "passed", "best_prompt", "judge_model", "thresholds",
                "simulated", "variants", "annotator_agreement"):
        assert key in report
    assert report["thresholds"]["min_r"] == 0.8 and report["thresholds"]["max_mae"] == 2.5
    assert report["best_prompt"] == "cec_v1" and report["judge_model"] == "tiny-judge"
    with Image.open(out / "scatter.png") as png:
        assert png.format == "PNG" and png.size[0] > 600
    assert "cec_v2: n=10 r=-1.000" in capsys.readouterr().out

    gate = find_passing_calibration(out, "tiny-judge", "cec_v1")
    assert gate["passed"] and gate["pearson_r"] == pytest.approx(0.939394, abs=1e-6)
    with pytest.raises(CalibrationError, match="failed calibration"):
        find_passing_calibration(out, "tiny-judge", "cec_v2")
    with pytest.raises(CalibrationError, match="not 'other-judge'"):
        find_passing_calibration(out / "calibration.json", "other-judge", "cec_v1")
    with pytest.raises(CalibrationError, match="no prompt variant 'cec_v9'"):
        find_passing_calibration(out, "tiny-judge", "cec_v9")
    with pytest.raises(CalibrationError, match="no calibration report"):
        find_passing_calibration(tmp_path / "nowhere", "tiny-judge", "cec_v1")

    # Stricter thresholds: nothing passes -> exit 1 with the reason on stderr; the report says passed false.
    assert calibrate_main(["--labels", str(labels), "--scores", str(good), "--out", str(out), "--min-r", "0.95",
                           "--judge-model", "tiny-judge"]) == 1
    assert "Pearson r 0.939 < 0.95" in capsys.readouterr().err
    assert json.loads((out / "calibration.json").read_text())["passed"] is False

    # Bad input -> exit 2 with one clear line; an unrelated existing folder is never overwritten.
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert calibrate_main(["--labels", str(labels), "--scores", str(good), "--out", str(tmp_path / "busy"),
                           "--judge-model", "m"]) == 2
    assert "not a calibration folder" in capsys.readouterr().err
    assert calibrate_main(["--labels", str(labels), "--scores", str(good), "--out", str(out)]) == 2
    assert "--judge-model" in capsys.readouterr().err
    assert calibrate_main(["--labels", str(labels), "--scores", str(good), "--out", str(out), "--judge-model", "m",
                           "--min-r", "1.5"]) == 2
    assert "--min-r must be in (0, 1]" in capsys.readouterr().err


def test_gate_refuses_simulated_labels_unless_allowed(tmp_path: Path) -> None:
    labels = _labels(tmp_path, simulated=True)
    out = tmp_path / "calib"
    assert calibrate_main(["--labels", str(labels), "--scores", str(_scores(tmp_path, "g.jsonl", "default", GOOD)),
                           "--out", str(out), "--judge-model", "rule"]) == 0
    assert json.loads((out / "calibration.json").read_text())["n_simulated_labels"] == 10
    with pytest.raises(CalibrationError, match="SIMULATED"):
        find_passing_calibration(out, "rule", "default")
    assert find_passing_calibration(out, "rule", "default", allow_simulated=True)["simulated"] is True


def test_prompt_versions_are_tracked_and_gated(tmp_path: Path) -> None:
    rows = [{"id": f"s{k}", "score": g, "prompt": "cec_v1", "prompt_sha": "aaa"} for k, g in enumerate(GOOD)]
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", rows[:5] + [dict(r, prompt_sha="bbb") for r in rows[5:]])
    with pytest.raises(CalibrationError, match="prompt_sha 'bbb' differs from 'aaa'"):
        load_scores([mixed])
    out = tmp_path / "calib"
    scores = _write_jsonl(tmp_path / "s.jsonl", rows)
    assert calibrate_main(["--labels", str(_labels(tmp_path)), "--scores", str(scores), "--out", str(out),
                           "--judge-model", "m"]) == 0
    assert find_passing_calibration(out, "m", "cec_v1", prompt_sha="aaa")["prompt_sha"] == "aaa"
    with pytest.raises(CalibrationError, match="prompt file changed"):
        find_passing_calibration(out, "m", "cec_v1", prompt_sha="ccc")


def test_server_path_scores_every_prompt_with_the_judge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``--server`` builds one CECJudge per prompt variant and feeds it the labelled samples (judge stubbed)."""
    import types

    import rewards.cec

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "x.png")
    labels = _write_jsonl(tmp_path / "labels.jsonl", [
        {"id": f"s{k}", "human_score": h, "source_image": "img/x.png", "edited_image": "img/x.png",
         "instruction": f"edit {k}", "cot": None} for k, h in enumerate(HUMAN)])
    seen: list[tuple[str, str | None, str]] = []

    class StubJudge:
        def __init__(self, url: str, model: str | None, prompt: str) -> None:
            seen.append((url, model, prompt))
            self.prompt = types.SimpleNamespace(name=prompt, sha=f"sha-{prompt}")
            self.model = "served-judge"

        def __call__(self, batch) -> list[float | None]:  # noqa: ANN001 - RewardBatch
            offsets = {"good": GOOD, "bad": INVERTED}[self.prompt.name]
            return [float(offsets[int(i.split()[-1])]) for i in batch.instructions]

        def close(self) -> None:
            pass

    monkeypatch.setattr(rewards.cec, "CECJudge", StubJudge)
    out = tmp_path / "calib"
    assert calibrate_main(["--labels", str(labels), "--server", "http://judge:1", "--prompts", "good", "bad",
                           "--out", str(out)]) == 0
    assert seen == [("http://judge:1", None, "good"), ("http://judge:1", None, "bad")]
    report = json.loads((out / "calibration.json").read_text())
    assert report["judge_model"] == "served-judge" and report["best_prompt"] == "good"
    assert report["pearson_r"] == pytest.approx(0.939394, abs=1e-6)
    assert {v["prompt"]: v["prompt_sha"] for v in report["variants"]} == {"good": "sha-good", "bad": "sha-bad"}
    written = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(written) == 20 and load_scores([out / "scores.jsonl"])[0]["good"]["s3"] == GOOD[3]
    assert load_scores([out / "scores.jsonl"])[1] == {"good": "sha-good", "bad": "sha-bad"}
    assert calibrate_main(["--labels", str(labels), "--server", "http://judge:1", "--out", str(out)]) == 2

    from rewards.client import RequestRefused

    def refuse(self, batch) -> list[float | None]:  # noqa: ANN001
        raise RequestRefused("HTTP 400: prompt too long")

    monkeypatch.setattr(StubJudge, "__call__", refuse)
    assert calibrate_main(["--labels", str(labels), "--server", "http://judge:1", "--prompts", "good", "--out",
                           str(out)]) == 2
    assert "failed while scoring prompt 'good': HTTP 400: prompt too long" in capsys.readouterr().err
