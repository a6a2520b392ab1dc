"""``python -m medloc.curriculum.replay``: on a generated trajectory its JSONL output equals a
hand computation from docs/method.md §3; overrides by field name (``check_stability=false``,
``schedule=v_triune``) change exactly what they should; ``--plot`` writes a PNG; a bad line or an
unknown override key fails with a clear message, exit status 2 and no output.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medloc.curriculum.replay import apply_overrides, main

REPO = Path(__file__).resolve().parents[2]

# Logged steps 1..8 (1-based, as a trainer might log them), two samples each.
IOUS = [
    [0.9, 0.7],  # s0
    [0.8, 0.2],  # s1
    [0.6, 0.6],  # s2
    [0.5, 0.7],  # s3
    [0.9, 0.9],  # s4
    [0.4, 0.4],  # s5
    [0.8, 0.6],  # s6
    [0.5, 0.3],  # s7
]


@pytest.fixture
def trajectory(tmp_path: Path) -> Path:
    path = tmp_path / "traj.jsonl"
    lines = [json.dumps({"step": k + 1, "ious": v}) for k, v in enumerate(IOUS)]
    path.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is allowed
    return path


def run(argv: list[str], capsys) -> tuple[int, list[dict], str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def null_stats(step: int, tau: float) -> dict:
    return {"step": step, "tau": tau, "raised": False, "hit_rate": None, "std": None, "margin": None}


def assert_rows(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.keys() == e.keys()
        for key in e:
            if isinstance(e[key], float) and key != "tau":
                assert g[key] == pytest.approx(e[key], abs=1e-12), (g, e)
            else:
                assert g[key] == e[key], (g, e)


def test_replay_matches_hand_computation(trajectory, capsys):
    """window=4, otherwise docs/method.md defaults: τ0 = 0.3, P = 0.8, S = 0.2, Δ = 0.1, semi keeps 2.

    s0-s2: window not full -> null statistics, τ 0.3.
    s3: window s0..s3, hits at 0.3: [1, 1/2, 1, 1] -> r̄ = 3.5/4 = 0.875 (>= .8 ok);
        σ: deviations .125 -.375 .125 .125 -> .1875/4 = .046875 -> σ = .216506 > .2 FAIL;
        mean IoUs .8 .5 .6 .6 -> .625 -> m̄ = .325. No raise.
    s4: window s1..s4: hits [1/2, 1, 1, 1] -> r̄ .875, σ .216506 FAIL; IoUs .5 .6 .6 .9 -> m̄ .35.
    s5: window s2..s5: hits [1, 1, 1, 1] -> r̄ 1, σ 0; IoUs .6 .6 .9 .4 -> .625 -> m̄ .325
        -> RAISE to 0.45; keep s4, s5.
    s6: 3 entries -> null, τ 0.45.
    s7: window s4..s7 under 0.45: hits [1, 0, 1, 1/2] -> r̄ .625 < .8 FAIL;
        σ: deviations .375 -.625 .375 -.125 -> .6875/4 = .171875 -> .414578;
        IoUs .9 .4 .7 .4 -> .6 -> m̄ .15. No raise.
    """
    code, rows, err = run(["--trajectory", str(trajectory), "window=4"], capsys)
    assert code == 0, err
    assert_rows(rows, [
        null_stats(1, 0.3), null_stats(2, 0.3), null_stats(3, 0.3),
        {"step": 4, "tau": 0.3, "raised": False, "hit_rate": 0.875, "std": math.sqrt(0.046875),
         "margin": 0.325},
        {"step": 5, "tau": 0.3, "raised": False, "hit_rate": 0.875, "std": math.sqrt(0.046875),
         "margin": 0.35},
        {"step": 6, "tau": 0.3, "raised": True, "hit_rate": 1.0, "std": 0.0, "margin": 0.325},
        null_stats(7, 0.45),
        {"step": 8, "tau": 0.45, "raised": False, "hit_rate": 0.625, "std": math.sqrt(0.171875),
         "margin": 0.15},
    ])


def test_replay_override_switches_off_stability(trajectory, capsys):
    """check_stability=false: s3 now raises (r̄ .875 >= .8, m̄ .325 >= .1) to 0.45, keeping s2, s3.
    s4: 3 entries -> null. s5: s2..s5 under 0.45: hits [1, 1, 1, 0] -> r̄ .75 < .8, no raise
    (σ: deviations .25 .25 .25 -.75 -> .75/4 = .1875 -> .433013; IoUs .6 .6 .9 .4 -> m̄ .175).
    s6: s3..s6: hits [1, 1, 0, 1] -> r̄ .75, same σ; IoUs .6 .9 .4 .7 -> m̄ .65 - .45 = .2.
    s7: s4..s7: as before r̄ .625, σ .414578, m̄ .15. One raise in total.
    """
    code, rows, _ = run(["--trajectory", str(trajectory), "window=4", "check_stability=false"], capsys)
    assert code == 0
    assert [r["raised"] for r in rows] == [False, False, False, True, False, False, False, False]
    assert [r["tau"] for r in rows] == [0.3] * 4 + [0.45] * 4
    assert rows[4]["hit_rate"] is None
    assert rows[5]["hit_rate"] == pytest.approx(0.75, abs=1e-12)
    assert rows[5]["std"] == pytest.approx(math.sqrt(0.1875), abs=1e-12)
    assert rows[5]["margin"] == pytest.approx(0.175, abs=1e-12)
    assert rows[6]["margin"] == pytest.approx(0.2, abs=1e-12)


def test_replay_progress_schedule_uses_trajectory_length(trajectory, capsys):
    # T = 8 lines: t/T = 0, .125, .25, .375, ... -> ε 0.85, then 0.95 (t/T <= .25), then 0.99
    code, rows, _ = run(["--trajectory", str(trajectory), "schedule=v_triune"], capsys)
    assert code == 0
    assert [r["tau"] for r in rows] == [0.85, 0.95, 0.95, 0.99, 0.99, 0.99, 0.99, 0.99]
    assert [r["raised"] for r in rows] == [True, False, True, False, False, False, False, False]
    assert all(r["hit_rate"] is None for r in rows)


def test_replay_plot_writes_png(trajectory, tmp_path, capsys):
    out = tmp_path / "plot.png"
    code, rows, _ = run(["--trajectory", str(trajectory), "window=4", "--plot", str(out)], capsys)
    assert code == 0 and len(rows) == 8
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"step": 0, "ious": [0.5]}\n{"step": 1, "ious": [0.5]\n', r":2: not valid JSON"),
        ('{"step": 0, "ious": [0.5]}\n\n{"step": 1, "ious": [1.5]}\n', r":3: ious\[0\]=1\.5 is not a number in \[0, 1\]"),
        ('{"step": 0, "ious": []}\n', r":1: ious must be a non-empty list"),
        ('{"step": 2, "ious": [0.1]}\n{"step": 2, "ious": [0.1]}\n', r":2: step 2 does not follow step 2"),
        ('{"step": "a", "ious": [0.1]}\n', r":1: step='a' must be an integer"),
        ('[0.1, 0.2]\n', r':1: expected an object \{"step": int, "ious": \[numbers\]\}'),
        ("\n\n", r"the trajectory has no steps"),
    ],
)
def test_bad_trajectory_lines_fail_with_line_number(tmp_path, capsys, content, message):
    import re

    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    code, rows, err = run(["--trajectory", str(path)], capsys)
    assert code == 2
    assert rows == []  # nothing on stdout
    assert re.search(message, err), err
    assert str(path) in err


def test_unknown_override_key_and_bad_value(trajectory, capsys):
    code, rows, err = run(["--trajectory", str(trajectory), "windw=4"], capsys)
    assert code == 2 and rows == []
    assert "unknown override key 'windw'" in err and "window" in err
    code, _, err = run(["--trajectory", str(trajectory), "check_reward=maybe"], capsys)
    assert code == 2 and "check_reward='maybe': expected true or false" in err
    code, _, err = run(["--trajectory", str(trajectory), "window=1"], capsys)
    assert code == 2 and "curriculum.window=1 must be an integer >= 2" in err
    code, _, err = run(["--trajectory", str(trajectory), "window"], capsys)
    assert code == 2 and "is not key=value" in err
    code, _, err = run(["--trajectory", str(tmp_missing := trajectory.with_name("nope.jsonl"))], capsys)
    assert code == 2 and str(tmp_missing) in err


def test_apply_overrides_types():
    cfg = apply_overrides(["refresh=quarter", "tau0=0.2", "window=12", "check_margin=False",
                           "pass_table=[[0, 0.7, 0.3]]", "op=>"])
    assert (cfg.refresh, cfg.tau0, cfg.window, cfg.check_margin, cfg.op) == ("quarter", 0.2, 12, False, ">")
    assert cfg.pass_table == [[0, 0.7, 0.3]]


def test_module_entry_point(trajectory):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "medloc.curriculum.replay", "--trajectory", str(trajectory), "window=4"],
        check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["raised"] for r in rows].index(True) == 5
