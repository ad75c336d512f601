"""Search targets and budgets: what parses, and the one sentence for what does not."""

from __future__ import annotations

import pytest

from qcompiler.errors import QCompilerError
from qcompiler.search_target import METRICS, Target, parse_budget, parse_target


@pytest.mark.parametrize("text, metric, bound", [("cos>=0.998", "cos", 0.998), (" kl <= 0.05 ", "kl", 0.05),
                                                  ("min-cos>=0.99", "min-cos", 0.99), ("ppl<=1.05", "ppl", 1.05)])
def test_targets_parse(text, metric, bound):
    target = parse_target(text)
    assert target.metric is METRICS[metric] and target.bound == bound


@pytest.mark.parametrize("text, sentence", [("cos>0.9", "not METRIC>=VALUE"), ("bleu>=3", "unknown metric 'bleu'"),
                                            ("cos<=0.9", "higher when better"), ("kl>=0.1", "lower when better"),
                                            ("cos>=1e999", "finite")])
def test_bad_targets_are_one_sentence(text, sentence):
    with pytest.raises(QCompilerError, match=sentence):
        parse_target(text)


def test_budgets_parse():
    assert [parse_budget(t) for t in (None, 90, "90", "90s", "20m", "1.5h")] == [None, 90, 90, 90, 1200, 5400]
    for bad in ("soon", "-5m", "0", 0):
        with pytest.raises(QCompilerError, match="budget"):
            parse_budget(bad)


def test_a_target_compares_in_its_metrics_direction():
    assert parse_target("cos>=0.99").met(0.995) and not parse_target("cos>=0.99").met(0.98)
    assert parse_target("kl<=0.05").met(0.01) and not parse_target("kl<=0.05").met(float("nan"))
    assert str(parse_target(" ppl <= 1.05")) == "ppl<=1.05" and isinstance(parse_target("top1>=0.9"), Target)
