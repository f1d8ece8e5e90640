"""The calibration gate: a VLM-judge reward is used only after its prompt passed calibration against humans.

Before Stage 2 starts, every reward component that is a served VLM judge (``cec_vlm``, or ``rewards.cec:CECJudge``
named by dotted path, or a subclass) needs a passing
``calibration.json`` from ``metacot reward calibrate`` for the same judge model and prompt variant (Pearson r and
MAE within the thresholds recorded there). ``judge.allow_uncalibrated=true`` overrides the gate; the override is
recorded in the run folder (``gate.json``) and the metrics. Rule-based and ground-truth rewards need no gate.
"""

from __future__ import annotations

from typing import Any


class CalibrationGateError(RuntimeError):
    """The run uses a VLM judge without a passing calibration report."""


def is_vlm_judge(name: str, opts: Any) -> bool:
    """Whether the component ``rewards.<name>`` is the served VLM judge, however it is named: ``cec_vlm``, a dotted
    path to ``rewards.cec:CECJudge``, or a subclass of it. All of them get the ``judge`` block's settings and pass
    this gate."""
    from rewards.cec import CECJudge
    from rewards.contract import RewardSpecError, resolve_reward

    spec = dict(opts or {}).get("fn", name)
    if not isinstance(spec, str):
        return False
    try:
        obj = resolve_reward(spec)
    except RewardSpecError:  # reported by the reward spec check
        return False
    return isinstance(obj, type) and issubclass(obj, CECJudge)


def uses_vlm_judge(rewards: dict[str, Any]) -> bool:
    return any(is_vlm_judge(name, opts) for name, opts in rewards.items())


def check_calibration_gate(cfg: Any) -> dict[str, Any]:
    """Refuse to start unless the VLM judge in ``cfg.rewards`` is calibrated; returns what to record.

    Raises:
        CalibrationGateError: no calibration file, a failing one, or one for another judge model / prompt.
    """
    judge = cfg.judge
    if not uses_vlm_judge(cfg.rewards):
        return {"vlm_judge": False}
    record = {"vlm_judge": True, "judge_model": judge.model, "prompt": judge.prompt,
              "calibration": judge.calibration, "override": bool(judge.allow_uncalibrated)}
    if judge.allow_uncalibrated:
        return {**record, "passed": None}
    if not judge.calibration:
        raise CalibrationGateError(
            "the reward uses the VLM judge (cec_vlm) but judge.calibration is empty: run `metacot reward calibrate` "
            "with human labels and pass judge.calibration=DIR/calibration.json, or set judge.allow_uncalibrated=true "
            "(recorded in the run)")
    from rewards.calibration import find_passing_calibration
    from rewards.cec import load_prompt

    prompt = load_prompt(judge.prompt)  # the gate also pins the prompt file's content (its hash)
    record["prompt_sha"] = prompt.sha
    try:
        report = find_passing_calibration(judge.calibration, judge.model, prompt.name, prompt_sha=prompt.sha,
                                          allow_simulated=judge.allow_simulated_labels)
    except Exception as exc:  # its message says what failed (missing file, not passing, other model/prompt)
        raise CalibrationGateError(f"calibration gate: {exc}") from exc
    return {**record, "passed": True, "pearson_r": report.get("pearson_r"), "mae": report.get("mae"),
            "n": report.get("n")}
