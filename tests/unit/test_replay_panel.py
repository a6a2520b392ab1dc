"""eval.replay_panel: every arm's schedule replayed on the full rule's recorded IoUs, checked
against decisions worked out by hand; and the ablation table's "same τ trajectory" marking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.replay_panel import build_panel, main
from eval.runs import discover_runs
from eval.table_spec import SAME_TAU_PATH, build_table
from eval.tau_paths import TauPath, first_difference

DATASET = "phantom_ham10000"


def _write_run(root: Path, arm: str, curriculum: dict, *, ious: list[list[float]] | None = None,
               trained: list[tuple[float, bool]] | None = None, seed: int = 0) -> Path:
    """A finished run folder: run_info, eval/metrics.json, resolved_config.json (its schedule),
    optionally ious.jsonl (recorded IoUs) and metrics.jsonl (the τ it trained with)."""
    run = root / DATASET / arm / f"seed{seed}"
    (run / "eval").mkdir(parents=True)
    (run / "run_info.json").write_text(json.dumps(
        {"dataset": DATASET, "arm": arm, "seed": seed, "model": "tiny-1m"}))
    (run / "eval" / "metrics.json").write_text(json.dumps(
        {"acc@0.5": 0.1, "acc@0.8": 0.0, "pseudo_map": 0.05}))
    (run / "resolved_config.json").write_text(json.dumps({"curriculum": curriculum}))
    if ious is not None:
        (run / "ious.jsonl").write_text(
            "".join(json.dumps({"step": k, "ious": v}) + "\n" for k, v in enumerate(ious)))
    if trained is not None:
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": k, "curriculum/tau": t, "curriculum/raised": float(up)}) + "\n"
            for k, (t, up) in enumerate(trained)))
    return run


# The full rule of the criteria test: N = 2, semi refresh (keeps the newest 1 entry), τ0 = 0.2,
# δ = 0.1 flat, Δ = 0.1, P = 0.5, S = 0.2 (σ = population std of the 2 per-step hit rates).
CRITERIA_FULL = {"schedule": "medloc", "window": 2, "refresh": "semi", "step": "piecewise",
                 "tau0": 0.2, "tau_target": 0.5, "delta": 0.1, "piecewise_bands": [[0.0, 0.1]],
                 "pass_table": [[0.0, 0.5, 0.2]], "check_reward": True, "check_stability": True,
                 "check_margin": True}
# Eight IoUs per step. Per step: hit rate h at τ = 0.2, 0.3 and 0.4 (the same for every step at
# all three τ but s1 at 0.4 and s4 below 0.5), mean IoU μ.
CRITERIA_IOUS = [
    [0.5] * 8,              # s0: h = 1 (τ <= 0.5),         μ = 0.5
    [0.3] * 4 + [0.0] * 4,  # s1: h = 0.5 (τ <= 0.3), 0 at 0.4, μ = 0.15
    [0.8] * 4 + [0.0] * 4,  # s2: h = 0.5,                  μ = 0.4
    [0.8] * 3 + [0.0] * 5,  # s3: h = 0.375,                μ = 0.3
    [0.5] * 6 + [0.0] * 2,  # s4: h = 0.75 (τ <= 0.5),      μ = 0.375
]
# The full rule's decisions (τ = 0.2 throughout; r̄ = mean h, σ = |h_a - h_b| / 2, m̄ = mean μ - τ):
#   step 1 (s0,s1): r̄ 0.75 ok,   σ 0.25 FAILS, m̄ 0.125 ok  -> hold (only stability fails)
#   step 2 (s1,s2): r̄ 0.5 ok,    σ 0 ok,       m̄ 0.075 FAILS -> hold (only margin fails)
#   step 3 (s2,s3): r̄ 0.4375 FAILS, σ 0.0625 ok, m̄ 0.15 ok   -> hold (only reward fails)
#   step 4 (s3,s4): r̄ 0.5625 ok, σ 0.1875 ok,  m̄ 0.1375 ok  -> raise 0.2 -> 0.3
# Each variant, from its first differing decision on, on its own τ (the window keeps 1 entry):
#   w/o stability: raises at 1 (-> 0.3); at 0.3: step 2 m̄ = 0.275 - 0.3 < 0.1, step 3 r̄ 0.4375,
#                  step 4 m̄ = 0.3375 - 0.3 = 0.0375: holds. Raises [1], final 0.3.
#   reward only:   raises at 1 (-> 0.3), at 2 (r̄ 0.5 at 0.3 -> 0.4); step 3 at 0.4 r̄ 0.4375
#                  holds; step 4 at 0.4: h(s3) 0.375, h(s4) 0.75, r̄ 0.5625 -> 0.5. [1, 2, 4].
#   w/o margin:    holds at 1 (σ); raises at 2 (-> 0.3); step 3 r̄ 0.4375 holds; step 4 at 0.3:
#                  r̄ 0.5625, σ 0.1875 -> 0.4. Raises [2, 4], final 0.4.
#   w/o reward:    holds at 1 (σ), at 2 (m̄); raises at 3 (-> 0.3); step 4 at 0.3: σ 0.1875 ok,
#                  m̄ 0.0375 < 0.1 holds. Raises [3], final 0.3.
CRITERIA_EXPECTED = {  # arm: (raise steps, final τ, first decision that differs)
    "medloc": ([4], 0.3, None),
    "no_stability_check": ([1], 0.3, 1),
    "reward_check_only": ([1, 2, 4], 0.5, 1),
    "no_margin_check": ([2, 4], 0.4, 2),
    "no_reward_check": ([3], 0.3, 3),
}
CRITERIA_SWITCHES = {
    "medloc": {},
    "no_reward_check": {"check_reward": False},
    "no_margin_check": {"check_margin": False},
    "no_stability_check": {"check_stability": False},
    "reward_check_only": {"check_margin": False, "check_stability": False},
}


def _raise_steps(path: TauPath) -> list[int]:
    return [s for s, up in zip(path.steps, path.raised) if up]


@pytest.fixture
def criteria_sweep(tmp_path: Path) -> Path:
    full_trained = [(0.2, False)] * 4 + [(0.2, True)]  # the full rule's trained run: raise at 4
    for arm, switches in CRITERIA_SWITCHES.items():
        # Trained runs: w/o reward check took the full rule's τ path; the others raised at 2.
        trained = full_trained if arm in ("medloc", "no_reward_check") else (
            [(0.2, False), (0.2, False), (0.2, True), (0.3, False), (0.3, False)])
        _write_run(tmp_path, arm, {**CRITERIA_FULL, **switches}, trained=trained,
                   ious=CRITERIA_IOUS if arm == "medloc" else None)
    return tmp_path


def test_criteria_replay_makes_the_hand_worked_decisions(criteria_sweep):
    rows, notes = build_panel(criteria_sweep, "criteria")
    assert notes == []
    assert [r.arm for r in rows] == ["medloc", "no_reward_check", "no_margin_check",
                                     "no_stability_check", "reward_check_only"]
    for r in rows:
        raises, final, differs = CRITERIA_EXPECTED[r.arm]
        assert _raise_steps(r.replayed) == raises, r.arm
        assert r.replayed.final_tau == pytest.approx(final, abs=1e-12), r.arm
        assert r.replay_differs_at == differs, r.arm
        assert r.replayed.taus[0] == 0.2
    # the trained columns compare each arm's own run with the full rule's
    trained = {r.arm: r.trained_differs_at for r in rows}
    assert trained == {"medloc": None, "no_reward_check": None, "no_margin_check": 2,
                       "no_stability_check": 2, "reward_check_only": 2}


def test_refresh_replay_waits_as_long_as_each_rule_keeps_the_window(tmp_path):
    # Every step perfect (IoU 1): all three checks pass whenever the window is full (N = 8), so
    # each raise waits exactly until the refreshed window is full again. The first decision is
    # at step 7; then semi keeps 4 (next at +4), full keeps 0 (+8), quarter keeps 8 - 8//4 = 6
    # (+2), none keeps 8 (+1). δ = 0.05 flat from τ0 = 0.2.
    base = {**CRITERIA_FULL, "window": 8, "tau_target": 0.9, "delta": 0.0,
            "piecewise_bands": [[0.0, 0.05]], "pass_table": [[0.0, 0.5, 0.5]]}
    arms = {"medloc": "semi", "refresh_full": "full", "refresh_quarter": "quarter",
            "refresh_none": "none"}
    for arm, mode in arms.items():
        _write_run(tmp_path, arm, {**base, "refresh": mode},
                   ious=[[1.0] * 4] * 20 if arm == "medloc" else None)
    rows, _ = build_panel(tmp_path, "refresh")
    got = {r.arm: (_raise_steps(r.replayed), r.replayed.final_tau, r.replay_differs_at)
           for r in rows}
    assert got["medloc"] == ([7, 11, 15, 19], pytest.approx(0.4), None)
    assert got["refresh_full"] == ([7, 15], pytest.approx(0.3), 11)
    assert got["refresh_quarter"] == ([7, 9, 11, 13, 15, 17, 19], pytest.approx(0.55), 9)
    assert got["refresh_none"] == (list(range(7, 20)), pytest.approx(0.85), 8)
    assert all(r.trained is None and r.trained_differs_at is None for r in rows)


def test_decay_replay_takes_each_step_form(tmp_path):
    # Perfect steps, N = 2, no refresh: after the first full window every step raises, by
    # δ(τ) of its form (τ0 = 0.2, τ_target = 0.5, δ0 = 0.2, δ_min = 0.02; τ rounded to 6 places):
    #   piecewise δ = 0.1:  0.2 -> 0.3 -> 0.4 -> 0.5
    #   linear  δ = 0.2·(1 - (τ-0.2)/0.3): 0.2 -> 0.4 -> 0.466667 (δ 0.066667) -> 0.488889
    #           (δ 0.022222) -> 0.5 (δ 0.007407 floored to 0.02, capped at 0.5)
    #   cosine  δ = 0.2·½(1 + cos(π(τ-0.2)/0.3)): 0.2 -> 0.4 -> 0.45 (δ 0.05) -> 0.47
    #           (δ 0.0134 -> 0.02) -> 0.49 (δ 0.0049 -> 0.02) -> 0.5
    base = {**CRITERIA_FULL, "refresh": "none", "delta": 0.0, "delta0": 0.2,
            "delta_min": 0.02, "pass_table": [[0.0, 0.5, 0.5]]}
    arms = {"medloc": "piecewise", "medloc_linear": "linear", "medloc_cosine": "cosine"}
    for arm, step in arms.items():
        _write_run(tmp_path, arm, {**base, "step": step},
                   ious=[[1.0] * 4] * 8 if arm == "medloc" else None)
    rows, _ = build_panel(tmp_path, "decay")
    taus = {r.arm: [r.replayed.tau_after(k) for k in range(1, 7)] for r in rows}
    assert taus["medloc"] == pytest.approx([0.3, 0.4, 0.5, 0.5, 0.5, 0.5])
    assert taus["medloc_linear"] == pytest.approx([0.4, 0.466667, 0.488889, 0.5, 0.5, 0.5])
    assert taus["medloc_cosine"] == pytest.approx([0.4, 0.45, 0.47, 0.49, 0.5, 0.5])
    assert {r.arm: r.replay_differs_at for r in rows} == {
        "medloc": None, "medloc_linear": 1, "medloc_cosine": 1}
    assert {r.arm: r.replayed.n_raises for r in rows} == {
        "medloc": 3, "medloc_linear": 4, "medloc_cosine": 5}


def test_first_difference_counts_a_raise_to_another_tau():
    a = TauPath((0, 1, 2), (0.1, 0.1, 0.2), (False, True, False), 0.2)
    b = TauPath((0, 1, 2), (0.1, 0.1, 0.25), (False, True, False), 0.25)
    assert first_difference(a, a) is None
    assert first_difference(a, b) == 1
    # the decision after step 1 raised τ: 0.2 is first used at step 2 (issue 20, finding 5)
    assert a.describe() == "0.1 →0.2@2"
    assert a.first_step_after(1) == 2 and a.first_step_after(2) == 3


def test_ablation_table_marks_a_row_with_the_full_rules_tau_path(criteria_sweep):
    table = build_table(discover_runs(criteria_sweep), "criteria")
    labels = {e.arm: e.row for e in table.entries}
    assert labels["no_reward_check"] == f"w/o reward check ({SAME_TAU_PATH})"
    assert SAME_TAU_PATH not in labels["no_margin_check"]
    assert SAME_TAU_PATH not in labels["medloc"]
    assert any(SAME_TAU_PATH in n and "eval.replay_panel" in n for n in table.notes)


def test_cli_writes_table_csv_and_png(criteria_sweep, capsys):
    assert main([str(criteria_sweep), "--table", "criteria"]) == 0
    md = (criteria_sweep / "criteria_replay.md").read_text()
    assert "| w/o margin check" not in md  # labels are the table's
    assert "| w/o IoU-margin check | 2 | step 2 | 0.4 | 0.2 →0.3@3 →0.4@5 |" in md
    csv_text = (criteria_sweep / "criteria_replay.csv").read_text().splitlines()
    assert csv_text[0].startswith("dataset,model,seed,arm,label,replay_raises")
    assert len(csv_text) == 1 + 5
    png = criteria_sweep / "plots" / "criteria_replay.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Counterfactual replay: criteria" in capsys.readouterr().out


def test_cli_without_a_full_rule_run_says_what_is_missing(tmp_path, capsys):
    _write_run(tmp_path, "no_margin_check", {**CRITERIA_FULL, "check_margin": False})
    assert main([str(tmp_path), "--table", "criteria"]) == 1
    err = capsys.readouterr().err
    assert "no run of the full rule (medloc) with an ious.jsonl" in err
    assert not (tmp_path / "criteria_replay.md").exists()


@pytest.mark.parametrize(("tau_next", "described"), [
    (0.4, "0.2 →0.3@2 →0.4@4"),  # logged since curriculum/tau_next exists
    (None, "0.2 →0.3@2 →?@4"),   # a run made before it: the last raise's τ is unknown
])
def test_a_trained_run_that_raises_at_its_last_step_names_its_final_tau(tmp_path, tau_next,
                                                                         described):
    from eval.tau_paths import trained_path

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "curriculum/tau": 0.2, "curriculum/raised": 0.0},
            {"step": 1, "curriculum/tau": 0.2, "curriculum/raised": 1.0},
            {"step": 2, "curriculum/tau": 0.3, "curriculum/raised": 0.0},
            {"step": 3, "curriculum/tau": 0.3, "curriculum/raised": 1.0}]
    if tau_next is not None:
        for row, nxt in zip(rows, (0.2, 0.3, 0.3, tau_next)):
            row["curriculum/tau_next"] = nxt
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = trained_path(run)
    assert path.final_tau == tau_next
    assert path.n_raises == 2
    assert path.describe() == described
