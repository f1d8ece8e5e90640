"""Labelling files and server without a browser: sample validation, resumable append-only labels, HTTP errors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from rewards.labeling import LabelError, LabelSession, cot_text, label_main, load_labels, load_samples, start_server


def _samples(tmp_path: Path, n: int = 2, **extra: object) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    rows = [{"id": f"s{k}", "source_image": "img/a.png", "edited_image": "img/a.png", "instruction": "do it",
             "cot": None, **extra} for k in range(n)]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_samples_are_validated_with_every_problem_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "source_image": "missing.png", "edited_image": "missing.png", "instruction": "x"}),
        json.dumps({"id": "b", "source_image": "x"}),
        "{not json",
    ]) + "\n")
    with pytest.raises(LabelError, match=r"bad.jsonl:3: not valid JSON"):
        load_samples(path)
    path.write_text("\n".join([
        json.dumps({"id": "a", "source_image": "missing.png", "edited_image": "missing.png", "instruction": "x"}),
        json.dumps({"id": "b", "source_image": "x"}),
        json.dumps({"id": "a", "source_image": "x", "edited_image": "x", "instruction": "x"}),
        json.dumps({"id": ["c"], "source_image": "x", "edited_image": "x", "instruction": "x"}),
    ]) + "\n")
    with pytest.raises(LabelError) as err:
        load_samples(path)
    text = str(err.value)
    assert "5 problem(s)" in text  # line 1 has two (both images missing)
    for expected in ("bad.jsonl:1: source_image file", "bad.jsonl:2: missing field(s)",
                     "bad.jsonl:3: duplicate id 'a' (first on line 1)", "bad.jsonl:4: 'id' must be"):
        assert expected in text


def test_session_appends_resumes_and_refuses_bad_answers(tmp_path: Path) -> None:
    samples = _samples(tmp_path, 3, category="add")
    out = tmp_path / "labels.jsonl"
    session = LabelSession(samples, out, "ann")
    assert session.state()["sample"]["id"] == "s0" and session.state()["sample"]["cot"] == ""
    state = session.record("s0", 4)
    assert state["done"] == 1 and state["sample"]["id"] == "s1"
    for bad_id, bad_score, message in (("s0", 5, "already labelled"), ("zz", 5, "unknown sample"),
                                       ("s1", 11, "integer 0-10"), ("s1", 2.5, "integer 0-10"),
                                       ("s1", True, "integer 0-10")):
        with pytest.raises(LabelError, match=message):
            session.record(bad_id, bad_score)
    assert len(out.read_text().splitlines()) == 1  # refused answers write nothing
    resumed = LabelSession(samples, out, "ann")
    assert resumed.done == {"s0"} and resumed.next_sample()["id"] == "s1"
    line = json.loads(out.read_text())
    assert line["human_score"] == 4 and line["annotator"] == "ann" and line["category"] == "add"
    assert line["source_image"] == "img/a.png" and "labelled_at" in line
    with pytest.raises(LabelError, match="annotator name is empty"):
        LabelSession(samples, out, " ")


def test_http_endpoints(tmp_path: Path) -> None:
    samples = _samples(tmp_path)
    out = tmp_path / "labels.jsonl"
    server = start_server(LabelSession(samples, out, "ann"), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with httpx.Client(base_url=base, timeout=10) as client:
            assert "Does the edit do what the reasoning says?" in client.get("/").text
            state = client.get("/api/state").json()
            assert state["total"] == 2 and state["sample"]["source_url"] == "/image/0/source_image"
            image = client.get(state["sample"]["edited_url"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            # Only listed images are served: no paths, no other fields, no out-of-range index.
            for path in ("/image/0/instruction", "/image/9/source_image", "/image/../../etc/passwd", "/nope"):
                assert client.get(path).status_code == 404
            assert client.post("/api/label", json={"id": "s0", "score": "7"}).status_code == 400
            assert client.post("/api/label", content=b"{oops").status_code == 400
            ok = client.post("/api/label", json={"id": "s0", "score": 7})
            assert ok.status_code == 200 and ok.json()["done"] == 1
            assert client.post("/api/label", json={"id": "s0", "score": 7}).json()["error"].endswith(
                "is already labelled by 'ann'")
    finally:
        server.shutdown()
        server.server_close()
    assert load_labels(out)["s0"].human_score == 7.0


def test_label_main_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert label_main(["--samples", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "l.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cot_dicts_are_rendered_for_the_page() -> None:
    from data_recipes.synth import make_edit_sample
    from metacot.cot import render, to_dict

    _, edit = make_edit_sample(0, 3, 32)
    assert cot_text(to_dict(edit.cot)) == render(edit.cot)
    assert cot_text("as is") == "as is" and cot_text(None) == ""
