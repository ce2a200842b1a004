"""Adding a comparison scheme is one generator and one `register` line (sipt/schemes.py): the config
accepts it, `sipt plan` costs it and the judge scores with it."""

import pytest
from test_judge import Scripted, consistent, items_for, pick, run_scheme

from sipt import config as config_mod, plan, schemes


def ladder(n, rng, suffix):
    """Each candidate against the next one only: n - 1 comparisons."""
    yield [(i, i + 1, 0) for i in range(n - 1)]


@pytest.fixture
def ladder_scheme():
    schemes.register(schemes.SchemeSpec("ladder", ladder, lambda n, has_suffix: max(0, n - 1),
                                        "each candidate against the next"))
    yield "ladder"
    schemes.SCHEMES.pop("ladder")


def test_a_registered_scheme_is_seen_by_config_plan_and_judge(ladder_scheme, tmp_path):
    cfg = config_mod.build({"judge": {"scheme": ladder_scheme}})  # choices are read from the registry
    assert cfg.judge.scheme == "ladder"
    with pytest.raises(Exception, match="ladder"):
        config_mod.build({"judge": {"scheme": "no-such-scheme"}})
    assert "ladder (each candidate against the next)" in schemes.described()
    assert schemes.comparisons_needed("ladder", 9) == 8

    costs = plan.per_prompt(config_mod.build({"judge": {"objectives": ["quality"], "candidates": ["rollouts"]}}),
                            "ladder", 8, 64)
    assert costs["judge_calls"] == 7

    # the judge: a consistent judge over 0 < 1 < 2 < 3 scores the ends 0 and 1, the middle ones 0.5
    item, j = run_scheme(items_for([0, 1, 2, 3]), Scripted(consistent), "ladder")
    assert item.scores["quality"] == [0.0, 0.5, 0.5, 1.0]
    assert item.comparisons["quality"] == [1, 2, 2, 1]
    chosen, rejected = pick(item)
    assert (chosen, rejected) == (3, 0)
