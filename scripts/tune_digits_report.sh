#!/usr/bin/env bash
# The issue-6 report: weak base config vs a 12-trial TPE study on digits, then retrain the best YAML.
#   scripts/tune_digits_report.sh [OUT_DIR]      (default runs/tune-report; CPU, about 15-30 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
out=${1:-runs/tune-report}
rm -rf "$out"
start=$(date +%s)
"$PY" -m pipeline tune configs/tune_digits.yaml tune.output_dir="$out" tune.n_trials=12
tuned=$(date +%s)
study="$out/digits"
# The base config alone (the study saved it), and the best trial retrained from its YAML.
"$PY" -m pipeline train "$study/base_config.yaml" run.output_dir="$out" run.name=base > /dev/null
"$PY" -m pipeline train "$study/best_config.yaml" run.output_dir="$out" run.name=best-retrained > /dev/null
"$PY" - "$out" "$study" "$((tuned - start))" <<'PYEOF'
import json, sys
from pathlib import Path
out, study, seconds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
def best_val(run):
    return max(json.loads(line)["val/accuracy"] for line in (run / "metrics.jsonl").read_text().splitlines())
summary = json.loads((study / "study.json").read_text())
report = {"trials": summary["n_trials"], "states": {k: v for k, v in summary["states"].items() if v},
          "study_wall_seconds": seconds, "base_val_accuracy": best_val(out / "base"),
          "best_trial": summary["best_trial"], "best_trial_val_accuracy": summary["best_value"],
          "best_retrained_val_accuracy": best_val(out / "best-retrained"), "best_overrides": summary["best_overrides"]}
report["retrain_reproduces"] = report["best_retrained_val_accuracy"] == report["best_trial_val_accuracy"]
report["beats_base"] = report["best_trial_val_accuracy"] > report["base_val_accuracy"]
(out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PYEOF
