"""The labelling page in a real headless Chromium: clicks score buttons, saves, resumes after a restart.

Chromium is driven over the DevTools protocol through ``--remote-debugging-pipe`` (JSON messages separated by NUL
bytes on file descriptors 3 and 4), which needs only the standard library: no websocket client. Clicks are real
mouse events dispatched at the buttons' on-screen centres (``Input.dispatchMouseEvent``), not ``element.click()``.
Setup: ``apt-get install -y chromium`` (Debian); under CI=true a missing chromium fails the test.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from rewards.labeling import LabelSession, load_labels, start_server
from tests.conftest import require

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """A headless Chromium with one page, driven over the DevTools pipe."""

    def __init__(self, user_dir: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4; a tiny Python trampoline puts the pipe ends
        # there before exec (no preexec_fn, which is unsafe with the server thread running).
        trampoline = ("import os,sys; os.dup2(int(sys.argv[1]),3); os.dup2(int(sys.argv[2]),4); "
                      "os.execv(sys.argv[3], sys.argv[3:])")
        cmd = [sys.executable, "-c", trampoline, str(to_chrome_r), str(from_chrome_w), CHROMIUM or "chromium",
               "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--remote-debugging-pipe", f"--user-data-dir={user_dir}", "about:blank"]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self._cond = threading.Condition()
        threading.Thread(target=self._reader, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=1200, height=1500,
                  deviceScaleFactor=1, mobile=False)

    def _reader(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()

    def send(self, method: str, session: bool = False, timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        with self._cond:
            if not self._cond.wait_for(lambda: self._next_id in self._replies, timeout=timeout):
                raise TimeoutError(f"chromium did not answer {method} within {timeout} s")
            reply = self._replies.pop(self._next_id)
        if "error" in reply:
            raise RuntimeError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def js(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0) -> Any:
        end = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < end:
            try:
                value = self.js(expression)
            except RuntimeError as exc:  # e.g. the element does not exist yet
                last_error, value = exc, None
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expression!r} (last error: {last_error})")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def click(self, selector: str) -> None:
        """A real left click at the element's centre (the element is scrolled into view first)."""
        rect = self.wait_for(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            f" e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
            f" return {{x: r.x + r.width / 2, y: r.y + r.height / 2}}; }})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", session=True, type=kind, x=rect["x"], y=rect["y"],
                      button="left", clickCount=1)

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (TimeoutError, RuntimeError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)


@pytest.fixture
def samples_file(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    lines = []
    colours = [(220, 40, 40), (40, 160, 60), (40, 80, 220)]
    for k, colour in enumerate(colours):
        src = Image.new("RGB", (32, 32), (240, 240, 240))
        src.paste(colour, (8, 8, 20, 20))
        out = Image.new("RGB", (32, 32), (240, 240, 240))
        out.paste((250, 200, 0), (8, 8, 20, 20))
        src.save(tmp_path / "img" / f"s{k}_src.png")
        out.save(tmp_path / "img" / f"s{k}_out.png")
        lines.append({"id": f"s{k}", "source_image": f"img/s{k}_src.png", "edited_image": f"img/s{k}_out.png",
                      "instruction": f"Make object {k} yellow", "category": "recolor",
                      "cot": "TASK SUMMARY\nmeta-tasks: Replace\n...\nTARGET TRAVERSAL\n- the square: changed"})
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _serve(session: LabelSession) -> tuple[Any, str]:
    server = start_server(session, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def test_click_through_save_and_resume(samples_file: Path, tmp_path: Path) -> None:
    require(CHROMIUM is not None, "chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "labels" / "labels.jsonl"
    server, url = _serve(LabelSession(samples_file, out, "alice"))
    browser = Chromium(tmp_path / "chrome-profile")
    try:
        browser.goto(url)
        browser.wait_for("document.getElementById('sample-id').textContent === 's0'")
        assert browser.js("document.getElementById('progress-text').textContent") == "0 of 3 labelled by alice"
        browser.wait_for("document.getElementById('edited').complete && "
                         "document.getElementById('edited').naturalWidth === 32")
        browser.screenshot(tmp_path / "label_page.png")
        shutil.copy(tmp_path / "label_page.png", Path(os.environ.get("LABEL_UI_SHOT", tmp_path / "shot.png")))

        browser.click("#save")  # disabled until a score is chosen: nothing may be saved
        time.sleep(0.3)
        assert not out.exists()

        browser.click("#score-4")
        browser.click("#score-7")  # changing one's mind before saving is allowed
        browser.click("#save")
        browser.wait_for("document.getElementById('sample-id').textContent === 's1'")
        browser.click("#score-3")
        browser.click("#save")
        browser.wait_for("document.getElementById('progress-text').textContent === '2 of 3 labelled by alice'")
    finally:
        browser.close()
        server.shutdown()
        server.server_close()

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["human_score"], r["annotator"]) for r in rows] == [("s0", 7, "alice"), ("s1", 3, "alice")]
    # Paths are rewritten relative to the labels file's folder and still point at the images.
    assert rows[0]["source_image"] == "../img/s0_src.png"
    assert (out.parent / rows[0]["edited_image"]).resolve() == (samples_file.parent / "img/s0_out.png").resolve()

    # A restarted server resumes at the first sample alice has not labelled; bob starts from the beginning.
    session = LabelSession(samples_file, out, "alice")
    assert session.done == {"s0", "s1"} and session.next_sample()["id"] == "s2"
    assert LabelSession(samples_file, out, "bob").next_sample()["id"] == "s0"
    server, url = _serve(session)
    browser = Chromium(tmp_path / "chrome-profile-2")
    try:
        browser.goto(url)
        browser.wait_for("document.getElementById('sample-id').textContent === 's2'")
        browser.click("#score-10")
        browser.click("#save")
        text = browser.wait_for("document.getElementById('finished').style.display === 'block' && "
                                "document.getElementById('finished-text').textContent")
        assert "alice labelled all 3 samples" in text
    finally:
        browser.close()
        server.shutdown()
        server.server_close()
    items = load_labels(out)
    assert {k: v.human_score for k, v in items.items()} == {"s0": 7.0, "s1": 3.0, "s2": 10.0}
