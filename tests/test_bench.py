"""`python -m pipelines bench --profile tiny`: it runs the real stages, writes the CSV, the numbers are sane."""

import math
import subprocess
import sys

import pandas as pd

from pipelines.bench import COLUMNS
from rlhf.config import PROJECT_ROOT

STAGES = {
    "data: sampling pi_ref",
    "reward model: training",
    "PPO: rollout",
    "PPO: scoring (pi_old, pi_ref, V, r_phi)",
    "PPO: update (policy + V)",
    "DPO: pi_ref log-probs",
    "DPO: training",
    "eval in PPO: sampling",
    "eval in DPO: sampling",
    "Preferred-FT: training",
    "eval in PPO: the whole point",
    "eval in DPO: the whole point",
    "machine: dense matmul at the model's shapes",
}


def test_bench_tiny_writes_a_sane_table(tmp_path):
    runs = tmp_path / "runs"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "bench",
            "--profile",
            "tiny",
            f"runs_dir={runs}",
            f"report.out_dir={tmp_path / 'reports'}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_csv(tmp_path / "reports" / "tiny" / "bench.csv")
    assert list(table.columns) == COLUMNS
    assert STAGES <= set(table["stage"])
    assert set(table["precision"]) == {"fp32"}  # the tiny profile's model.precision
    assert {"bare model: train", "bare model: forward", "bare model: generate"} <= set(table["stage"])
    # the machine's limit: dense matmuls at the model's shapes, what every FLOP/s is a fraction of
    limit = table[table["kind"] == "matmul"]
    assert len(limit) == 1 and limit["tflops_per_s"].iloc[0] > 0 and limit["of_limit"].iloc[0] == 1
    for _, row in table[table["kind"] != "matmul"].iterrows():
        assert row["tokens"] > 0 and row["seconds"] > 0 and row["peak_memory_mb"] > 0, row.to_dict()
        assert math.isclose(row["tokens_per_s"], row["tokens"] / row["seconds"], rel_tol=1e-6)
        if row["kind"] != "eval":  # an eval point as a whole has no bare-model equivalent
            assert math.isclose(row["ratio"], row["tokens_per_s"] / row["ceiling_tokens_per_s"], rel_tol=1e-6)
            assert 0 < row["ratio"] < 100, row.to_dict()
        if not row["stage"].startswith("eval in") or row["kind"] == "eval":  # the split rows do not split FLOPs
            assert math.isclose(row["of_limit"], row["tflops_per_s"] / limit["tflops_per_s"].iloc[0], rel_tol=1e-6)
            assert 0 < row["of_limit"] < 10, row.to_dict()  # PPO's passes skip the head over the prompt
    assert "ceiling_tokens_per_s" in out.stdout and "DPO: training" in out.stdout  # the printed table
    assert not runs.exists()  # the stages ran in a temporary runs directory, not the profile's


def test_eval_share_counts_completed_training_runs_only(tiny_cfg):
    import json

    from pipelines.bench import eval_shares

    root = PROJECT_ROOT / tiny_cfg.runs_dir / "tiny"
    for method, status, run_id in (("dpo", "completed", "a"), ("ppo", "failed", "b"), ("reference", "completed", "c")):
        (root / method / run_id).mkdir(parents=True)
        (root / method / run_id / "manifest.json").write_text(json.dumps({"method": method, "status": status}))
        (root / method / run_id / "timings.json").write_text(
            json.dumps({"train": {"seconds": 60.0}, "ref_logps": {"seconds": 20.0}, "eval": {"seconds": 20.0}})
        )
    shares = eval_shares(tiny_cfg)
    assert shares["run"].tolist() == ["dpo/a"] and shares["eval_share"].tolist() == [0.2]
