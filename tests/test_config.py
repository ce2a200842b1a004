import dataclasses
import re

import pytest

from sipt import config as c
from sipt.errors import SiptError


def test_defaults_and_types():
    cfg = c.build({})
    assert cfg.data.suffix_tokens == 128
    assert cfg.run.seed == 0
    cfg = c.build({"data": {"eval_fraction": 1}})  # an int where a float is expected is fine
    assert cfg.data.eval_fraction == 1.0


def test_unknown_key_suggests_closest():
    with pytest.raises(SiptError, match=r"unknown key 'data.sufix_tokens'.*Did you mean 'suffix_tokens'"):
        c.build({"data": {"sufix_tokens": 64}}, "x.toml")


def test_unknown_section_suggests_closest():
    with pytest.raises(SiptError, match=r"unknown section \[dta\].*Did you mean 'data'"):
        c.build({"dta": {}})


def test_wrong_type_and_choice_are_errors():
    with pytest.raises(SiptError, match="data.suffix_tokens' must be int"):
        c.build({"data": {"suffix_tokens": "many"}})
    with pytest.raises(SiptError, match="not one of"):
        c.build({"model": {"preset": "huge"}})


def test_override_parsing():
    assert c.parse_override("data.suffix_tokens=64") == ("data", "suffix_tokens", 64)
    assert c.parse_override("data.inputs=['a', 'b']") == ("data", "inputs", ["a", "b"])
    assert c.parse_override("data.text_column=body") == ("data", "text_column", "body")
    with pytest.raises(SiptError, match="section.key=value"):
        c.parse_override("suffix_tokens=64")


def test_freeze_refuse_force(tmp_path):
    import json

    run = tmp_path / "run"
    cfg = c.resolve(run, overrides=["data.suffix_tokens=64"])
    assert (run / "sipt.toml").exists()
    # Same values again, and speed-only keys, are accepted.
    assert c.resolve(run).data.suffix_tokens == 64
    assert c.resolve(run, overrides=["data.tokenize_batch_size=7"]).data.tokenize_batch_size == 7
    assert c.resolve(run).data.tokenize_batch_size == 512  # not frozen
    # No finished stage depends on data.* yet: a new value is frozen without complaint.
    assert c.resolve(run, overrides=["data.suffix_tokens=48"]).data.suffix_tokens == 48
    assert c.resolve(run).data.suffix_tokens == 48
    (run / "samples").mkdir()
    (run / "samples" / "_SUCCESS.json").write_text(json.dumps({"config_sections": ["run", "data"]}))
    with pytest.raises(SiptError, match=r"data.suffix_tokens \(48 -> 32, used by samples\).*--force"):
        c.resolve(run, overrides=["data.suffix_tokens=32"])
    assert c.resolve(run, overrides=["rollout.n=4"]).rollout.n == 4  # rollout.* is not used yet
    c.resolve(run, overrides=["data.suffix_tokens=32"], force=True)
    assert c.resolve(run).data.suffix_tokens == 32
    assert cfg.hash(["data"]) != c.resolve(run).hash(["data"])


def test_bounds_name_real_keys_and_the_defaults_are_valid():
    cfg = c.build({})
    for dotted in c.BOUNDS:
        section, key = dotted.split(".")
        assert hasattr(cfg.sections[section], key), dotted
    c.validate(cfg)


@pytest.mark.parametrize("override, message", [
    ("rollout.n=-3", "rollout.n = -3 must be >= 1"),
    ("data.eval_fraction=2.0", "data.eval_fraction = 2.0 must be between 0 and 1"),
    ("train.batch_size=0", "train.batch_size = 0 must be >= 1"),
    ("judge.top_p=1.5", "judge.top_p = 1.5 must be between 0 and 1"),
    ("data.min_prefix_tokens=4000", "data.min_prefix_tokens = 4000 is larger than data.max_prefix_tokens"),
    ("rollout.engine='oracle'", "rollout.engine = 'oracle'"),
])
def test_a_refused_value_is_never_frozen(tmp_path, override, message):
    run = tmp_path / "run"
    with pytest.raises(SiptError, match=re.escape(message)):
        c.resolve(run, overrides=[override])
    assert not run.exists()  # a first command that is refused creates nothing
    c.resolve(run, overrides=["rollout.n=4"])
    frozen = (run / "sipt.toml").read_bytes()
    for force in (False, True):
        with pytest.raises(SiptError):
            c.resolve(run, overrides=[override], force=force)
        assert (run / "sipt.toml").read_bytes() == frozen


def test_the_command_check_runs_before_the_config_is_frozen(tmp_path):
    def check(cfg):
        raise SiptError(f"judge.world = {cfg.judge.world}: no kb.json")

    c.resolve(tmp_path, overrides=["rollout.n=4"])
    frozen = (tmp_path / "sipt.toml").read_bytes()
    with pytest.raises(SiptError, match="no kb.json"):
        c.resolve(tmp_path, overrides=["judge.world='/bad'"], check=check)
    assert (tmp_path / "sipt.toml").read_bytes() == frozen


def test_an_engine_model_folder_must_exist(tmp_path):
    cfg = c.build({"judge": {"engine": "hf", "model": str(tmp_path / "nope")}})
    with pytest.raises(SiptError, match=r"judge.model = .*nope: no such folder"):
        c.check_model("judge", cfg.judge)
    (tmp_path / "nope").mkdir()
    with pytest.raises(SiptError, match="not a Hugging Face model folder"):
        c.check_model("judge", cfg.judge)
    c.check_model("judge", c.build({"judge": {"engine": "openai", "model": "served-name"}}).judge)  # a name


def test_frozen_toml_round_trips(tmp_path):
    cfg = c.resolve(tmp_path, overrides=["data.inputs=['x y.jsonl', \"q'uote\"]", "data.filters=['rpv2-quality']"])
    again = c.build(c.load_toml(tmp_path / "sipt.toml"))
    assert again.to_dict() == cfg.to_dict()


def test_hash_depends_on_named_keys_only():
    a = c.build({})
    b = c.build({"data": {"suffix_tokens": 3}, "model": {"preset": "small"}})
    assert a.hash(["run"]) == b.hash(["run"])
    assert a.hash(["data.inputs"]) == b.hash(["data.inputs"])
    assert a.hash(["data"]) != b.hash(["data"])
    # speed-only keys never change a hash
    assert a.hash(["data"]) == c.build({"data": {"tokenize_batch_size": 1}}).hash(["data"])


def test_a_knob_added_later_leaves_old_hashes_alone_at_its_default():
    import hashlib
    import json

    a = c.build({})
    d = a.to_dict(results_only=True)["train"]
    del d["chosen_nll_weight"], d["group_by_length"]  # the train section as it was before the knobs existed
    before = hashlib.sha256(json.dumps({"train": d}, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert a.hash(["train"]) == before
    assert c.build({"train": {"chosen_nll_weight": 0.5}}).hash(["train"]) != before
    assert c.build({"train": {"group_by_length": 50}}).hash(["train"]) != before
    with pytest.raises(SiptError, match="rf-nll"):
        c.validate(c.build({"train": {"chosen_nll_weight": 0.5, "objective": "rf-nll"}}))
    c.validate(c.build({"train": {"chosen_nll_weight": 0.5, "objective": "ntp"}}))  # ignored by the NTP baseline


def test_every_key_is_documented():
    ref = c.reference_markdown()
    for name, cls in c.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help"
            assert f"`{f.name}`" in ref


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted(Path(__file__).parent.parent.joinpath("data", "configs").glob("*.toml"))
    assert configs
    for path in configs:
        c.validate(c.build(c.load_toml(path), str(path)), str(path))


def test_readme_reference_is_current():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert c.readme_with_reference(readme) == readme, "run `make docs` to regenerate the README reference"
