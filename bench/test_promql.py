"""Tests of the PromQL subset (`promql.py`) and the dashboard reading (`dashboard.py`) that the
plots use. Standard library only: `python3 bench/test_promql.py` from the repository root."""

import math
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dashboard  # noqa: E402
import promql  # noqa: E402
from promql import PromQLError, Store, evaluate_range  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def store_of(scrapes):
    """scrapes: [(t, [(name, labels, value)])]."""
    store = Store()
    for t, samples in scrapes:
        store.add_scrape(float(t), samples)
    return store


def at(text, store, t):
    return {labels: values[0] for labels, values in evaluate_range(text, store, [t]).items()}


class RateTest(unittest.TestCase):
    def test_a_steady_counter_gives_its_slope(self):
        store = store_of((t, [("c_total", {"k": "a"}, 10.0 * t + 100)]) for t in range(10))
        self.assertAlmostEqual(at("rate(c_total[4s])", store, 9.0)[(("k", "a"),)], 10.0)

    def test_extrapolation_follows_prometheus(self):
        # Samples at 1..3 in a window (0, 4]: sampled 2 s, 1 s to each edge (< 1.1 × 1 s), so the
        # increase of 20 is extrapolated over 4 s: 40, and 40 / 4 s = 10 per second. The zero
        # point (first value 0) caps the start: nothing extrapolates below zero.
        store = store_of([(1, [("c_total", {}, 10.0)]), (2, [("c_total", {}, 20.0)]),
                          (3, [("c_total", {}, 30.0)])])
        self.assertAlmostEqual(at("increase(c_total[4s])", store, 4.0)[()], 40.0)
        store = store_of([(1, [("c_total", {}, 0.0)]), (2, [("c_total", {}, 10.0)]),
                          (3, [("c_total", {}, 20.0)])])
        self.assertAlmostEqual(at("increase(c_total[4s])", store, 4.0)[()], 30.0)

    def test_a_counter_reset_is_not_a_negative_rate(self):
        store = store_of([(0, [("c_total", {}, 50.0)]), (1, [("c_total", {}, 60.0)]),
                          (2, [("c_total", {}, 5.0)]), (3, [("c_total", {}, 15.0)])])
        # 10, then a reset (the 60 before it carried over), then 5 and 10: 25 in 3 s sampled,
        # extrapolated by the 1 s to the window's start: 25 × 4 / 3.
        self.assertAlmostEqual(at("increase(c_total[4s])", store, 3.0)[()], 25.0 * 4.0 / 3.0)

    def test_one_sample_gives_no_rate(self):
        store = store_of([(0, [("c_total", {}, 5.0)])])
        self.assertEqual(at("rate(c_total[4s])", store, 0.0), {})


class AggregationTest(unittest.TestCase):
    def setUp(self):
        self.store = store_of((t, [
            ("req_total", {"route": "default", "outcome": "hit"}, 90.0 * t),
            ("req_total", {"route": "default", "outcome": "miss"}, 10.0 * t),
            ("req_total", {"route": "other", "outcome": "hit"}, 0.0),
        ]) for t in range(6))

    def test_sum_by_keeps_only_the_grouping_labels(self):
        result = at('sum by (outcome) (rate(req_total{route=~".*"}[4s]))', self.store, 5.0)
        self.assertAlmostEqual(result[(("outcome", "hit"),)], 90.0)
        self.assertAlmostEqual(result[(("outcome", "miss"),)], 10.0)
        self.assertEqual(len(result), 2)

    def test_the_hit_ratio_divides_matching_vectors(self):
        text = ('sum(rate(req_total{outcome=~"hit|coalesced"}[4s]))\n'
                '/ sum(rate(req_total[4s]))')
        self.assertAlmostEqual(at(text, self.store, 5.0)[()], 0.9)

    def test_regex_matchers_are_anchored(self):
        result = at('sum(rate(req_total{outcome=~"hi"}[4s]))', self.store, 5.0)
        self.assertEqual(result, {})

    def test_or_vector_fills_an_empty_sum_only(self):
        self.assertEqual(at('sum(rate(req_total{outcome="none"}[4s])) or vector(0)',
                            self.store, 5.0), {(): 0.0})
        self.assertAlmostEqual(at('sum(rate(req_total[4s])) or vector(0)',
                                  self.store, 5.0)[()], 100.0)

    def test_a_comparison_with_a_scalar_filters(self):
        self.assertEqual(at("count(req_total == 0)", self.store, 5.0), {(): 1.0})
        self.assertEqual(at("count(req_total == 7) or vector(0)", self.store, 5.0), {(): 0.0})

    def test_zero_over_zero_is_nan(self):
        idle = store_of((t, [("req_total", {}, 3.0)]) for t in range(6))
        text = "sum(rate(req_total[4s])) / sum(rate(req_total[4s]))"
        self.assertTrue(math.isnan(at(text, idle, 5.0)[()]))


class HistogramTest(unittest.TestCase):
    def buckets(self, t, counts):
        return [("d_bucket", {"route": "r", "le": le}, c) for le, c in counts]

    def test_the_quantile_interpolates_inside_its_bucket(self):
        store = store_of([
            (0, self.buckets(0, [("0.02", 0), ("0.04", 0), ("+Inf", 0)])),
            (1, self.buckets(1, [("0.02", 0), ("0.04", 10), ("+Inf", 10)])),
        ])
        text = "histogram_quantile(0.5, sum by (route, le) (rate(d_bucket[4s])))"
        self.assertAlmostEqual(at(text, store, 1.0)[(("route", "r"),)], 0.03)

    def test_the_top_bucket_answers_the_highest_finite_bound(self):
        self.assertEqual(promql.bucket_quantile(0.99, [(1.0, 0), (2.0, 1), (math.inf, 10)]), 2.0)

    def test_no_observations_is_nan(self):
        self.assertTrue(math.isnan(promql.bucket_quantile(0.5, [(1.0, 0), (math.inf, 0)])))


class StalenessTest(unittest.TestCase):
    def test_a_series_missing_from_a_scrape_is_gone(self):
        store = store_of([(0, [("g", {"client": "a"}, 3.0)]), (1, [])])
        self.assertEqual(at("max by (client) (g)", store, 0.5), {(("client", "a"),): 3.0})
        self.assertEqual(at("max by (client) (g)", store, 1.5), {})


class ParserTest(unittest.TestCase):
    def test_unsupported_syntax_is_an_error_not_a_guess(self):
        for text in ("sum without (a) (x)", "x and y", "topk(3, x)", "x / on(a) y", "x{"):
            with self.assertRaises(PromQLError, msg=text):
                promql.parse(text)

    def test_the_by_clause_may_follow_the_argument(self):
        store = store_of([(0, [("g", {"a": "1", "b": "2"}, 4.0)])])
        self.assertEqual(at("sum(g) by (a)", store, 0.0), {(("a", "1"),): 4.0})


class DashboardTest(unittest.TestCase):
    def setUp(self):
        self.dashboard = dashboard.load(os.path.join(ROOT, dashboard.DASHBOARD))
        self.values = dashboard.variables(self.dashboard, 1.0)

    def test_variables_expand_as_grafana_does_with_all_selected(self):
        self.assertEqual(self.values["route"], ".*")
        self.assertEqual(self.values["__rate_interval"], "4s")
        self.assertEqual(dashboard.expand("x[${__rate_interval}]", self.values), "x[4s]")
        with self.assertRaises(ValueError):
            dashboard.expand("x[$nope]", self.values)

    def test_every_panel_of_the_dashboard_parses(self):
        # Not only the plotted rows: a new panel with syntax the evaluator lacks shows up here.
        for panel in self.dashboard["panels"]:
            for target in panel.get("targets", []):
                promql.parse(dashboard.expand(target["expr"], self.values))

    def test_rows_group_the_flat_panel_list(self):
        found = dashboard.rows(self.dashboard, ("Overview", "Token path"))
        self.assertEqual([title for title, _ in found], ["Overview", "Token path"])
        self.assertTrue(all(p["type"] != "row" for _, panels in found for p in panels))
        with self.assertRaises(ValueError):
            dashboard.rows(self.dashboard, ("No such row",))

    def test_legends_follow_the_legend_format(self):
        labels = (("route", "default"), ("status", "429"))
        self.assertEqual(dashboard.legend("{{route}} {{status}}", labels), "default 429")
        self.assertEqual(dashboard.legend("", ()), "value")


if __name__ == "__main__":
    unittest.main()
