"""A small slice of the detection benchmark (benchmarks/bench_detection.py --corpus): real HF
Trainer runs of the failure corpus, and the synthetic rare shapes, through the same code."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks import failure_corpus as fc
from benchmarks.detection import endings, faults, hand_rules, synthetic, tail_price, verdicts


def test_nan_batch_in_a_real_trainer_run_is_caught_on_its_record() -> None:
    """HF Trainer, 40 steps, one NaN batch at step 25: the trainer's own log (loss filtered
    by logging_nan_inf_filter, grad_norm NaN) is enough for NonFiniteTraining at once; the
    healthy run of the same seed raises nothing."""
    runs = fc.build(fc.QUICK, say=lambda line: None)
    assert [(r.name, r.onset) for r in runs] == [("sft-healthy-s0", None), ("sft-nan_batch-s0", 25)]
    healthy, faulty = runs
    assert len(healthy.records) == len(faulty.records) == 40
    bad = next(r for r in faulty.records if r["step"] == 25)
    assert math.isnan(bad["grad_norm"] or 0.0)
    outcomes, false, healthy_steps, _ = verdicts.evaluate(runs)
    assert [(o.detector, o.delay) for o in outcomes] == [("NonFiniteTraining", 0)]
    # hand rules compare numbers: "grad norm > X" is False for NaN
    assert outcomes[0].static is None
    assert sum(false.values()) == 0 and healthy_steps == 40 + 24
    goals = verdicts.report(outcomes, false, healthy_steps, say=lambda line: None)
    assert goals["every fault caught within budget"]


def test_synthetic_rare_shapes_through_the_report() -> None:
    runs = synthetic.synthetic_corpus(2, 2000, np.random.default_rng(0))
    outcomes, _, healthy_steps, rules = verdicts.evaluate(runs)
    assert {o.fault for o in outcomes} == set(synthetic.SYNTHETIC_FAULTS)
    assert healthy_steps == 2000 + 2 * len(synthetic.SYNTHETIC_FAULTS) * 59
    lines: list[str] = []
    verdicts.report(outcomes, {}, healthy_steps, say=lines.append)
    assert lines[0].split()[:3] == ["detector", "budget", "faults"]
    # the hand rules were calibrated on the healthy stream: a static level per signal
    assert "syn-rl:GradNormSpike" in rules.static
    by = {(o.fault, o.detector): o for o in outcomes}
    assert by[("inf_loss", "NonFiniteTraining")].delay == 0
    assert by[("entropy_surge", "EntropySurge")].delay is not None


def test_hand_rules_judged_on_unseen_healthy_runs() -> None:
    """Fitted on one healthy stream, the hand rules are counted on another next to the
    detectors (a row per detector that has a hand rule)."""
    rng = np.random.default_rng(0)
    runs = [synthetic.synthetic_healthy(600, "syn-rl", rng) for _ in range(2)]
    runs[1].seed = 1
    lines: list[str] = []
    hand_rules.holdout_hand_rules(runs, say=lines.append)
    rows = [line.split() for line in lines[3:]]
    assert {row[1] for row in rows} >= {"GradNormSpike", "KLSurge", "LengthDrift"}
    assert all(row[0] == "syn-rl" and row[2] == "1" and row[3] == str(600) for row in rows)
    assert all(row[4].isdigit() and row[5].isdigit() for row in rows)


def test_synthetic_hand_rules_judged_on_a_second_draw_of_the_same_law() -> None:
    """The synthetic section's hand rules, fitted on one draw, are counted on a second draw
    next to the detectors; the static rule's catches on the onset record are priced as a
    one-record rule on real healthy streams (here a second synthetic draw stands for them)."""
    rng = np.random.default_rng(0)
    seen = synthetic.synthetic_corpus(2, 2000, rng)
    unseen = synthetic.synthetic_corpus(2, 2000, rng)
    _, false, _, rules = verdicts.evaluate(seen)
    lines: list[str] = []
    out = hand_rules.holdout_synthetic(rules, false, unseen, say=lines.append)
    assert {"LossSpike", "GradNormSpike", "KLSurge"} <= set(out)
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    for det, (ours, static, spike) in out.items():
        # in sample: the static rule raised no more than the detector did
        assert int(rows[det][1]) <= int(rows[det][0]), det
        assert rows[det][3:] == [str(ours), str(static), str(spike if spike is not None else "-")]
    # the static rule at the loss' healthy maximum catches the +0.15 step on its onset record
    got = tail_price.one_record_cost(rules, seen, unseen, "LossSpike", say=lines.append)
    assert got is not None
    low, past, scored = got
    assert low > 3.0 and scored == 2000 - 12 + 2 * len(synthetic.SYNTHETIC_FAULTS) * (59 - 12)
    assert past >= 0 and "one-record rule at z" in lines[-1]
    # the running-mean rule catches the KL surges on their onset record: priced on KLSurge's
    # own scale, log(KL + 0.01), and in the rule's own form, a ratio to the level in KL's units
    got = tail_price.one_record_cost(rules, seen, unseen, "KLSurge", rule="spike", say=lines.append)
    assert got is not None and got[0] > 6.0 and "running-mean rule caught 2" in lines[-2]
    assert lines[-1].startswith("    as a ratio: the onsets were 2")
    assert "healthy records reach" in lines[-1]


def test_hand_rules_calibrated_in_sample_to_the_detectors_false_alarms() -> None:
    """Each hand rule is the most sensitive one that raises no more false alarms than allowed
    on the same healthy streams (after the detectors' warm-up): allowed one, it raises at
    most one, and the next more sensitive static level would raise more."""
    rng = np.random.default_rng(0)
    healthy = [synthetic.synthetic_healthy(600, "syn-rl", rng) for _ in range(2)]
    for allowed in (0, 1):
        rules = hand_rules.calibrate(healthy, {"GradNormSpike": allowed, "KLSurge": allowed})
        for det in ("GradNormSpike", "KLSurge"):
            name, direction = faults.SIGNAL[det]
            assert rules.static_false[det] <= allowed and rules.spike_false[det] <= allowed

            def static_fa(x: float, name: str = name, direction: str = direction) -> int:
                return sum(
                    hand_rules.after_warmup(hand_rules.static_starts(r, name, direction, x), r, 12)
                    for r in healthy
                )

            assert static_fa(rules.static[det]) == rules.static_false[det]
            values = [x[name] for r in healthy for x in r.records[12:]]
            values = sorted(v for v in values if v is not None)
            below = max(v for v in values if v < rules.static[det])
            assert static_fa(below * (1 - 1e-9)) > allowed


def test_false_alarm_rates_count_the_steps_each_detector_judged() -> None:
    """An SFT run's steps count for the loss and grad-norm detectors, not for the RL ones; a
    fault run's records after its onset count for none."""
    sft = fc.build(fc.QUICK, say=lambda line: None)
    syn = synthetic.synthetic_fault("kl_surge", np.random.default_rng(0), 0)
    watched = faults.watched_steps([*sft, syn])
    assert watched["LossSpike"] == 40 + 24 + 59
    assert watched["KLSurge"] == 59 and "EntropyCollapse" in watched
    assert watched["NonFiniteTraining"] == 40 + 24 + 59


def test_corpus_built_in_two_processes_equals_one_and_keeps_cached_runs(tmp_path: Path) -> None:
    """``--jobs 2`` (failure_corpus.corpus, as bench_detection runs it): the runs missing from
    the cache are trained in two processes, each into a part file, and merged into the same
    runs, in the plan's order, as one process trains; a run already cached is reused as it
    is, not trained again; the part files are gone."""
    plan = fc.CorpusPlan(
        sft_steps=6,
        sft_fault_steps=6,
        sft_onset=4,
        sft_seeds=(0, 1),
        sft_long_seeds=(),
        rl_steps=0,
        trl_steps=0,
        sft_faults=("nan_batch",),
    )
    alone = fc.build(plan, say=lambda line: None)
    assert [r.name for r in alone] == ["sft-healthy-s0", "sft-healthy-s1", "sft-nan_batch-s0"]
    path = tmp_path / "corpus.json"
    kept = fc.CorpusRun("sft-healthy-s1", "sft", None, None, 1, [{"step": 1.0, "loss": 7.0}])
    fc.save([kept], path)
    said: list[str] = []
    runs = fc.corpus(path, jobs=2, plan=plan, say=said.append)
    assert said[0].endswith(": sft-healthy-s0, sft-nan_batch-s0")  # only the missing ones
    assert said[1].startswith("  2 runs in 2 processes") and "exit codes [0, 0]" in said[1]
    assert [r.name for r in runs] == [r.name for r in alone]
    assert runs[1] == kept
    for mine, one in zip((runs[0], runs[2]), (alone[0], alone[2]), strict=True):
        assert json.dumps(asdict(mine)) == json.dumps(asdict(one))  # NaN == NaN as text
    assert sorted(r.name for r in fc.load(path) or []) == sorted(r.name for r in runs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.json"]
    said.clear()
    assert len(fc.corpus(path, jobs=2, plan=plan, say=said.append)) == 3 and said == []


def test_a_fault_counts_for_a_detector_only_where_it_moved_its_signal() -> None:
    """A fault is judged for a detector only where its signal left MOVED x its pre-onset median
    within the detector's budget: a reward dip to 0.86 x its level is no collapse to catch, a
    fall to 0.3 x is; nothing counts as moved on a healthy run."""

    def run(after: list[float], seed: int = 0) -> fc.CorpusRun:
        rewards = [0.375] * 20 + after + [0.375] * 10
        records = [{"step": float(i), "reward_mean": v} for i, v in enumerate(rewards)]
        return fc.CorpusRun(f"trl-lr_jump-s{seed}", "trl", "lr_jump", 20, seed, records)

    assert not faults.signal_moved(run([0.375, 0.322, 0.375]), "RewardCollapse")
    assert faults.signal_moved(run([0.375, 0.11, 0.375]), "RewardCollapse")
    # past the detector's budget (5 records): not the fault's move to judge it on
    assert not faults.signal_moved(run([0.375] * 6 + [0.1]), "RewardCollapse")
    healthy = run([0.1])
    assert not faults.signal_moved(
        fc.CorpusRun("h", "trl", None, None, 0, healthy.records), "KLSurge"
    )
    outcomes, *_ = verdicts.evaluate([run([0.375, 0.322, 0.375]), run([0.1, 0.1, 0.1], seed=1)])
    judged = [o.run for o in outcomes if o.detector == "RewardCollapse"]
    assert judged == ["trl-lr_jump-s1"]
    # LengthDrift also reads the reward (a reward that pays for length): a length hack counts
    # where the reward doubled within the budget though the length had not yet moved 1.5 x
    records = [
        {"step": float(i), "reward_mean": 0.2 if i < 20 else 0.45, "completion_length_mean": n}
        for i, n in enumerate([36.0] * 20 + [30.0, 36.0, 42.0, 48.0, 47.0, 52.0, 64.0])
    ]
    hack = fc.CorpusRun("rl-length_hack-s0", "rl", "length_hack", 20, 0, records)
    assert faults.signal_moved(hack, "LengthDrift")
    level = [{**r, "reward_mean": 0.2} for r in records]
    assert not faults.signal_moved(
        fc.CorpusRun("l", "rl", "length_hack", 20, 0, level), "LengthDrift"
    )


def test_synthetic_signed_loss_has_the_heavy_tails_of_the_other_streams() -> None:
    """The GRPO policy loss of the synthetic healthy stream is Student t (5 degrees of freedom,
    excess kurtosis 6), like the other streams' noise, not Gaussian (0): the real corpus'
    healthy signed losses are heavy-tailed, and a Gaussian one handed a static rule at its
    healthy maximum every +0.15 step on its onset record."""
    run = synthetic.synthetic_healthy(50_000, "syn-rl", np.random.default_rng(3))
    loss = np.array([r["loss"] for r in run.records])
    centred = loss - loss.mean()
    kurtosis = float((centred**4).mean() / (centred**2).mean() ** 2 - 3.0)
    assert kurtosis > 2.0, kurtosis
    assert abs(float(loss.std()) - 0.02) < 0.002  # the spread of the Gaussian it replaced


def test_hill_tail_expects_the_count_a_pareto_law_puts_past_its_sample() -> None:
    """The tail estimate the KL pricing prints: on 20 seeded samples of a Pareto law of index 2
    (10,000 values each, P(X >= x) = x^-2), the count past 400, where no value of a sample lies
    (the truth: 10,000 / 400^2 = 0.0625), has its median within 1.5x of the truth; where the
    sample reaches the point itself there is no estimate (count instead)."""
    rng = np.random.default_rng(0)
    samples = [list(rng.pareto(2.0, 10_000) + 1.0) for _ in range(20)]
    assert all(max(s) < 400.0 for s in samples)
    estimates = sorted(tail_price.hill_tail(s, 400.0, k=50) or 0.0 for s in samples)
    median = 0.5 * (estimates[9] + estimates[10])
    assert 0.0625 / 1.5 < median < 0.0625 * 1.5, estimates
    assert tail_price.hill_tail(samples[0], 2.0, k=50) is None
    # the line printed: no healthy record that far, so the estimate per 10k is given
    line = tail_price.ratio_cost_line("KLSurge", [450.0, 500.0], samples[0])
    assert "0 of the real corpus' 10000 healthy records reach 450 x" in line
    assert "a Pareto tail fitted to the largest 50 expects" in line


def test_synthetic_running_mean_rules_are_counted_on_other_healthy_records() -> None:
    """The synthetic section's running-mean multipliers, carried to other healthy records (the
    real corpus' in the benchmark; a noisier draw here): the false alarms each raises there,
    after the detectors' warm-up, printed beside the detector's own count."""
    rng = np.random.default_rng(0)
    seen = synthetic.synthetic_corpus(1, 2000, rng)
    _, _, _, rules = verdicts.evaluate(seen)
    noisy = synthetic.synthetic_healthy(2000, "syn-rl", rng)
    for r in noisy.records:  # KL three times as spread as the law the rules were fitted on
        r["kl"] = (r["kl"] or 0.0) ** 3 * 400.0
    lines: list[str] = []
    out = hand_rules.spike_rules_on(rules, [noisy], {"KLSurge": 7}, say=lines.append)
    assert set(out) == {k.split(":")[1] for k in rules.spike}
    m = next(v for k, v in rules.spike.items() if k.endswith(":KLSurge"))
    assert out["KLSurge"] == hand_rules.after_warmup(
        hand_rules.spike_starts(noisy, "kl", "up", m), noisy, 12
    )
    assert out["KLSurge"] > 0 and f"KLSurge {m:.3g} x: {out['KLSurge']} (7)" in lines[-1]


def test_other_synthetic_draws_are_summarised_a_line_each() -> None:
    """``--syn-seeds``: a draw's goals, late faults, most false alarms and hand-rule lines by
    detector, as the full report of that draw counts them."""
    summary = verdicts.summarise_draw(0, 1, 2000)
    runs = synthetic.synthetic_corpus(1, 2000, np.random.default_rng(0))
    outcomes, false, healthy, rules = verdicts.evaluate(runs)
    lines: list[str] = []
    goals = verdicts.report(
        outcomes, false, healthy, say=lines.append, watched=faults.watched_steps(runs), rules=rules
    )
    assert summary.goals == goals
    assert sum(summary.hand_first.values()) == sum(" vs " in line for line in lines)
    assert len(summary.late) == sum(" LATE " in line for line in lines)
    line = verdicts.draw_line(
        verdicts.DrawSummary(
            2,
            {"a": False, "b": True, "c": False},
            ["syn-grad_spikes_growing-t9 GradNormSpike 8"],
            ("EntropySurge", 0.5),
            {"KLSurge": 20, "GradNormSpike": 1},
        )
    )
    assert line == (
        "  seed 2: NO / yes / NO (late: syn-grad_spikes_growing-t9 GradNormSpike 8); most false "
        "alarms: EntropySurge 0.50 per 10k; hand rule first: GradNormSpike 1, KLSurge 20"
    )


def test_a_static_level_on_a_two_sided_signal_watches_the_side_it_was_fitted_on() -> None:
    """LengthDrift's signal is two-sided; its one static level is fitted as a rise above the
    healthy maximum (``calibrate``), so it is judged as one too (it was judged as a fall below
    it, which a healthy run is from its first record on)."""
    rng = np.random.default_rng(0)
    run = synthetic.synthetic_healthy(300, "syn-rl", rng)
    lengths = [r["completion_length_mean"] or 0.0 for r in run.records]
    x = sorted(lengths)[-3]  # two records above it
    both = hand_rules.static_starts(run, "completion_length_mean", "both", x)
    assert both == hand_rules.static_starts(run, "completion_length_mean", "up", x)
    assert 1 <= len(both) <= 2 and int(run.records[0]["step"] or 0) not in both


def test_endings_tell_a_fault_taken_for_the_level_from_a_value_back() -> None:
    """The synthetic loss step (+0.15 on a signed loss, to the run's end): LossSpike stays on
    under the default config; one that ends an alert on its first record within 100 robust
    SDs ends it while the loss is still up, which the benchmark's line counts as still away;
    a fault that does not last (an inf loss) is not judged."""
    from inversion_monitor.server.detectors import AlertsConfig

    run = synthetic.synthetic_fault("loss_step", np.random.default_rng(4), 0)
    assert endings.endings(run) == []
    quick = AlertsConfig()
    quick = quick.model_copy(
        update={
            "loss_spike": quick.loss_spike.model_copy(update={"back_records": 1, "back_z": 100.0})
        }
    )
    ends = endings.endings(run, quick)
    assert ends and all(e.detector == "LossSpike" and not e.back for e in ends)
    assert ends[0].ended == ends[0].fired + 1
    line = endings.endings_line(ends)
    assert f"ended while their fault lasted: {len(ends)}; the value back" in line
    assert line.endswith(f"still away (the fault taken for the run's level): LossSpike {len(ends)}")
    inf = synthetic.synthetic_fault("inf_loss", np.random.default_rng(4), 0)
    assert endings.endings(inf, quick) == []
