"""The user's path on `tiny`: `make reference`, `make ppo`, `make dpo`, the baselines, then `make report`, judged by
what lands on disk."""

import csv
import json
import re
import subprocess
import sys

import pytest

from rlhf.config import PROJECT_ROOT


def _cli(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pipelines", *args], cwd=PROJECT_ROOT, capture_output=True, timeout=900)
    # decoded by hand: text=True would turn a progress bar's carriage returns into new lines
    out.stdout, out.stderr = out.stdout.decode(), out.stderr.decode()
    return out


def _screen_lines(text: str) -> list[str]:
    """The lines a terminal is left showing: a progress bar redraws its line after each carriage return."""
    return [
        seen for line in text.split("\n") if (seen := next((s for s in reversed(line.split("\r")) if s.strip()), ""))
    ]


def test_ppo_dpo_baselines_then_report_on_tiny(tmp_path):
    common = [
        "--profile",
        "tiny",
        f"runs_dir={tmp_path / 'runs'}",
        f"report.out_dir={tmp_path / 'reports'}",
        "report_to=[tensorboard]",
    ]
    console = []
    for command in ("reference", "ppo", "dpo", "bon", "preferred-ft", "report"):
        out = _cli(command, *common)
        assert out.returncode == 0, f"{command}: {out.stderr[-3000:]}"
        console += _screen_lines(out.stdout) + _screen_lines(out.stderr)
    # Issue #20, item 3: the stages' own bars and summary lines, not the libraries' chatter; two screens at most
    assert not [line for line in console if "{'loss'" in line or "Loading weights" in line or "LOAD REPORT" in line]
    assert len(console) <= 100 and all(len(line) <= 200 for line in console), "\n".join(console)

    page = tmp_path / "reports" / "tiny" / "index.html"
    html = page.read_text()
    images = re.findall(r"<img[^>]+src=['\"]([^'\"]+)['\"]", html)
    assert len(images) >= 7  # the report's seven figures (analysis/plots.py)
    for name in images:
        data = (page.parent / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, name

    with open(page.parent / "headline.csv") as f:
        methods = {row["method"] for row in csv.DictReader(f)}
    assert methods == {"reference", "ppo", "dpo", "bon", "preferred-ft"}
    with open(page.parent / "frontier.csv") as f:
        assert {row["method"] for row in csv.DictReader(f)} == methods - {"reference"}  # π_ref: every one's origin
    summary = (page.parent / "summary.md").read_text()
    assert re.search(r"^\| PPO \|", summary, re.M) and re.search(r"^\| DPO \|", summary, re.M)  # legend names
    # The verdict opens the page and the summary; every eval point of every run kept its per-prompt values
    assert summary.split("\n## ")[1].startswith("Verdict: PPO vs DPO") and "PPO − DPO = " in summary
    assert html.index("Verdict: PPO vs DPO") < html.index("Headline")
    runs = tmp_path / "runs" / "tiny"
    for metrics in runs.glob("*/*/metrics.jsonl"):
        if metrics.parent.parent.name == "reward_model":
            continue  # its eval row is held-out pair accuracy: no policy samples
        steps = {row["step"] for row in map(json.loads, metrics.read_text().splitlines()) if row["kind"] == "eval"}
        kept = {int(p.name[9:15]) for p in (metrics.parent / "samples").glob("eval_step*.prompts.csv")}
        assert steps == kept, metrics.parent
        for step in steps:
            with open(metrics.parent / "samples" / f"eval_step{step:06d}.prompts.csv") as f:
                assert len(list(csv.DictReader(f))) == 8  # tiny's eval prompts
    # pi_ref's evaluation scores the held-out pairs for every DPO run (implicit reward 0: ties), so no DPO seed's
    # last eval point pays for that pass and their costs do not depend on which seed ran first
    (reference,) = runs.glob("reference/*/metrics.jsonl")
    row = json.loads(reference.read_text().splitlines()[-1])
    assert (row["heldout/implicit_accuracy"], row["heldout/implicit_margin"]) == (0.5, 0.0)
    assert len(list(runs.glob("eval-cache/pi_ref-*-pairs-*.pt"))) == 1
    _check_tensorboard(runs)


def _check_tensorboard(runs):
    """Issue #20, item 4: `report_to: [tensorboard]` puts every metrics row of every run into its tracker/ event
    files, and the evaluator's numbers arrive under the same tags for both methods."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    eval_tags = {}
    for metrics in runs.glob("*/*/metrics.jsonl"):
        events = EventAccumulator(str(metrics.parent / "tracker"))
        events.Reload()
        rows = [row for row in map(json.loads, metrics.read_text().splitlines()) if row["kind"] == "eval"]
        for key in ("eval/gold", "eval/kl"):
            if key in rows[0]:
                logged = events.Scalars(key)  # float32 there
                assert [e.step for e in logged] == [row["step"] for row in rows], (metrics.parent, key)
                assert [e.value for e in logged] == pytest.approx([row[key] for row in rows], rel=1e-6, abs=1e-7)
        eval_tags[metrics.parent.parent.name] = {t for t in events.Tags()["scalars"] if t.startswith("eval/")}
    assert eval_tags["ppo"] == eval_tags["dpo"] and {"eval/gold", "eval/kl", "eval/kl_k3"} <= eval_tags["ppo"]
