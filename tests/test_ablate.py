"""bench/ablate.py's pure parts: seeds aggregated into mean and 95% interval, cells, ordering verdicts.

The summaries are made by hand (the shape of eval's summary.json); no sipt run is started.
"""

import math

import pytest
from conftest import bench_module

ablate = bench_module("ablate")


def summary(quality=None, claim_precision=None, ci=None, versus=True, **extra):
    s = {"baseline": "initial", "quality_win_rate": quality, "claim_precision": claim_precision,
         "ci": ci or {}, **extra}
    if versus:
        s["versus"] = {"initial": {"quality_win_rate": quality,
                                   "quality_win_rate_ci": (ci or {}).get("quality_win_rate"), "n": 10}}
    return s


def test_two_seeds_mean_and_t_interval():
    agg = ablate.aggregate([summary(quality=60.0), summary(quality=70.0)], "quality_win_rate")
    half = 12.706 * math.sqrt(50.0) / math.sqrt(2)  # sd of (60, 70) = 7.071
    assert agg["values"] == [60.0, 70.0]
    assert agg["mean"] == pytest.approx(65.0)
    assert agg["lo"] == pytest.approx(65.0 - half) and agg["hi"] == pytest.approx(65.0 + half)
    assert agg["source"] == "seeds"
    assert ablate.cell(agg) == f"65.0 [{65 - half:.1f}, {65 + half:.1f}] (60.0, 70.0)"


def test_t_quantiles_by_number_of_seeds():
    assert [ablate.t975(k) for k in (2, 3, 5, 10)] == [12.706, 4.303, 2.776, 2.262]
    assert ablate.t975(30) == 2.262  # beyond the table: the k = 10 value
    mean, lo, hi = ablate.seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and hi - mean == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    with pytest.raises(ValueError):
        ablate.t975(1)


def test_one_seed_falls_back_to_the_bootstrap_interval():
    s = summary(quality=63.1, claim_precision=55.0, ci={"quality_win_rate": [55.2, 71.0], "claim_precision": [40.0, 70.0]})
    agg = ablate.aggregate([s], "quality_win_rate")
    assert (agg["mean"], agg["lo"], agg["hi"], agg["source"]) == (63.1, 55.2, 71.0, "bootstrap")
    assert ablate.cell(agg) == "63.1 [55.2, 71.0]"
    assert ablate.cell(ablate.aggregate([s], "claim_precision")) == "55.0 [40.0, 70.0]"
    # a seed without the metric: the other seed's bootstrap interval, its value shown as "–"
    agg = ablate.aggregate([s, summary(quality=None)], "quality_win_rate")
    assert ablate.cell(agg) == "63.1 [55.2, 71.0] (63.1, –)"


def test_missing_values_print_a_dash():
    assert ablate.cell(ablate.aggregate([summary(), summary()], "claim_precision")) == "–"
    assert ablate.cell(ablate.aggregate([None, {}], "repeat_share")) == "–"
    assert ablate.cell(ablate.aggregate([{"benchmark_avg": 55.0, "ci": {}}], "benchmark_avg")) == "55.0"
    assert ablate.fmt(None) == "–" and ablate.fmt(float("nan")) == "–" and ablate.fmt(0.123, 2) == "0.12"


def test_win_rates_are_read_versus_the_warm_start():
    s = {"baseline": "other", "quality_win_rate": 40.0, "ci": {"quality_win_rate": [30.0, 50.0]},
         "versus": {"initial": {"quality_win_rate": 80.0, "quality_win_rate_ci": [70.0, 90.0]},
                    "other": {"quality_win_rate": 40.0}}}
    assert ablate.metric(s, "quality_win_rate") == (80.0, (70.0, 90.0))
    # an older summary without `versus`: the top level and its ci
    assert ablate.metric({"quality_win_rate": 61.0, "ci": {"quality_win_rate": [50, 70]}}, "quality_win_rate") == (61.0, (50.0, 70.0))


def test_ordering_holds_only_when_the_paired_interval_clears_zero():
    # differences 10 and 12: mean 11, sd 1.414, half-width 12.706 * 1 = 12.7 -> crosses 0
    verdict = ablate.ordering([60.0, 62.0], [70.0, 74.0])
    assert verdict.startswith("not shown (difference +11.0 [-1.7, +23.7]")
    # differences 10, 11, 12 over 3 seeds: half-width 4.303 * 1 / sqrt(3) = 2.5 -> holds
    assert ablate.ordering([60, 62, 64], [70, 73, 76]).startswith("holds (difference +11.0 [+8.5, +13.5]")
    assert ablate.ordering([70, 73, 76], [60, 62, 64]).startswith("reversed")
    # seeds are paired: a seed missing on either side is left out
    assert ablate.ordering([60, None, 64, 62], [70, 80, 76, 73]).startswith("holds")
    assert ablate.ordering([60.0], [70.0]) == "not shown (difference +10.0, 1 seed: no interval)"
    assert ablate.ordering([None, None], [70.0, 71.0]) == "not measured"


def test_non_strict_ordering_holds_unless_the_interval_is_below_zero():
    assert ablate.ordering([80, 82], [78, 83], strict=False).startswith("holds")  # [-2, +1]: not below 0
    assert ablate.ordering([80, 82, 84], [70, 73, 76], strict=False).startswith("reversed")


def test_orderings_lines_and_table():
    def seeds(*q):
        return [summary(quality=v, claim_precision=v / 2) for v in q]

    by_name = {ablate._rollouts(2): seeds(50, 52, 54), ablate._rollouts(4): seeds(60, 63, 66),
               ablate._rollouts(8): seeds(70, 72, 74), ablate._rollouts(16): seeds(69, 71, 75)}
    lines = ablate.orderings(by_name)
    assert lines[0].startswith("Orderings (PAPER)")
    text = "\n".join(lines)
    assert "- rollouts 2 < 4, Quality (win % vs warm start): holds" in text
    assert "- rollouts 8 ≤ 16, Claim precision %: holds" in text
    assert "- all-pairs > pivot (8 rollouts), Quality (win % vs warm start): not run" in text
    assert len(lines) == 1 + len(ablate.ORDERINGS)

    md = ablate.table([("rollouts", "suffix vs 2 rollouts", seeds(60, 70), [1.0, None, 5.0], 100.4)])
    head, rule, row = md.splitlines()
    assert head.count("|") == rule.count("|") == row.count("|") == 13
    assert "| 65.0 [" in row and "(60.0, 70.0)" in row and "| 1 → – → 5 | 100 |" in row and "| – |" in row


def test_coinciding_variants_share_a_run_name():
    names = [ablate.run_name(o) for _, _, o in ablate.variants()]
    assert len(names) == 14 and len(set(names)) == 11
    for _, _, lower, higher, _ in ablate.ORDERINGS:
        assert lower in names and higher in names
    assert ablate.parse_seeds("0, 1,2") == [0, 1, 2]
