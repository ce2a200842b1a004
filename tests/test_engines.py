import pytest

from sipt import config as config_mod, engines
from sipt.engines import BaseEngine, Generation, Sampling
from sipt.errors import SiptError


class ToyEngine(BaseEngine):
    """Continues every prompt with its own seed's token, n times (no model)."""

    name = "toy"

    def __init__(self, model, cfg):
        self.model, self.cfg, self.closed = model, cfg, False
        self.tokenizer = lambda text: type("Encoded", (), {"input_ids": [len(text)]})()
        self.calls = []

    def generate(self, prompts, s):
        self.calls.append((len(prompts), s.seed))
        return [[Generation([s.seed], f"{p[0]}:{s.seed}", None, "length") for _ in range(s.n)] for p in prompts]

    def next_token_logprobs(self, prompts, token_ids):
        return [[0.0 for _ in token_ids] for _ in prompts]

    def close(self):
        self.closed = True


@pytest.fixture
def registry():
    saved = dict(engines._REGISTRY)
    yield engines
    engines._REGISTRY.clear()
    engines._REGISTRY.update(saved)


def test_the_builtin_engines_are_registered():
    assert list(config_mod.ENGINES) == ["hf", "vllm", "openai", "oracle"]
    assert engines.policy_engines() == "hf, vllm or openai"
    assert not engines.ENGINES["oracle"].policy and engines.ENGINES["openai"].served
    with pytest.raises(SiptError, match="engine 'oracle' cannot generate from a policy; use one of hf, vllm, openai"):
        engines.make_engine(config_mod.EngineConfig(engine="oracle"))


def test_a_registered_engine_is_a_valid_config_value_and_is_built(registry):
    with pytest.raises(SiptError, match="'rollout.engine' = 'toy' is not one of hf, vllm, openai, oracle"):
        config_mod.build({"rollout": {"engine": "toy"}})
    registry.register("toy", ToyEngine)
    cfg = config_mod.build({"rollout": {"engine": "toy", "model": "m"}, "judge": {"engine": "toy", "model": "m"}})
    config_mod.validate(cfg)
    with pytest.raises(SiptError, match="judge.model = m: no such folder"):  # not served: a local folder
        config_mod.check_model("judge", cfg.judge)
    with engines.make_engine(cfg.rollout) as e:
        assert isinstance(e, ToyEngine) and e.model == "m" and e.cfg is cfg.rollout
        assert e.generate_text(["ab", "c"], Sampling(n=2, seed=5))[1] == [Generation([5], "1:5", None, "length")] * 2
    assert e.closed


def test_a_judge_only_engine_is_refused_for_rollouts(registry):
    registry.register("toy", ToyEngine, policy=False)
    with pytest.raises(SiptError, match="rollout.engine = 'toy': the toy only judges and rewrites; use hf, vllm "
                                        "or openai"):
        config_mod.validate(config_mod.build({"rollout": {"engine": "toy"}}))


def test_generate_many_groups_prompts_by_seed_and_answers_each_once():
    e = ToyEngine("m", config_mod.EngineConfig())
    answered = []
    out = e.generate_many(["a", "b", "c", "d"], [7, 3, 7, 2**31 + 3], Sampling(), done=lambda i, g: answered.append(i))
    assert [g[0].text for g in out] == ["1:7", "1:3", "1:7", "1:3"]
    assert e.calls == [(1, 3), (2, 7), (1, 3)]  # seeds in ascending order, one batch per seed
    assert answered == [1, 0, 2, 3]


def test_an_engine_missing_a_contract_method_is_refused_at_registration(registry):
    class Broken:
        name = "broken"

        def generate(self, prompts, s):
            return []

    with pytest.raises(SiptError, match="Broken lacks generate_text, generate_many, next_token_logprobs, close"):
        registry.register("broken", Broken)
    assert "broken" not in config_mod.ENGINES

    class Misnamed(ToyEngine):
        name = "other"

    with pytest.raises(SiptError, match="Misnamed.name is 'other'; set it to 'misnamed'"):
        registry.register("misnamed", Misnamed)


def test_a_model_judge_answers_through_generate_many_whatever_the_engine():
    from sipt.backends import EngineBackend
    from sipt.judging import Call

    e = ToyEngine("m", config_mod.EngineConfig())
    backend = EngineBackend(e, "toy", {"safety": "{candidate}"}, "generate", False, 1.0, 1.0, 8)
    calls = [Call("safety", f"s{k}", ("suffix",), ("x" * k,), "", "", 0, seed) for k, seed in enumerate([9, 4, 9])]
    for c in calls:
        c.prompt = backend.identity(c)[0]
    answered = []
    backend.run(calls, answered.append)
    assert [c.response for c in calls] == ["0:9", "1:4", "2:9"] and answered == [calls[1], calls[0], calls[2]]
    assert e.calls == [(1, 4), (2, 9)]


def test_a_base_engine_subclass_must_still_write_generate(registry):
    class Half(BaseEngine):
        name = "half"

        def close(self):
            pass

    with pytest.raises(SiptError, match="Half lacks generate, next_token_logprobs;"):
        registry.register("half", Half)
