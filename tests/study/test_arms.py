import pytest

from mobillama.config import ModelConfig, get_preset
from mobillama.errors import MobiLlamaError
from mobillama.info import parameter_report
from mobillama.study.arms import build_arms, count_parameters

SMALL = ModelConfig(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


@pytest.mark.parametrize("base", [SMALL, get_preset("tiny"), get_preset("large-base-1.2b")])
def test_closed_form_count_equals_the_built_model(base):
    for arm in build_arms(base):
        assert arm.parameters == parameter_report(arm.config)["parameters"]["total"]


@pytest.mark.parametrize("base", [SMALL, get_preset("tiny"), get_preset("large-base-1.2b")])
def test_matched_arms_within_two_percent(base):
    arms = {a.name: a for a in build_arms(base)}
    target = arms["shared"].parameters
    for name in ("baseline1-thin", "baseline2-shallow"):
        assert abs(arms[name].parameters - target) / target <= 0.02, name
    assert arms["baseline1-thin"].config.num_hidden_layers == base.num_hidden_layers
    assert arms["baseline1-thin"].config.hidden_size < base.hidden_size
    assert arms["baseline2-shallow"].config.hidden_size == base.hidden_size
    assert arms["baseline2-shallow"].config.num_hidden_layers < base.num_hidden_layers
    assert all(
        arms[n].config.ffn_sharing == "none" for n in ("baseline1-thin", "baseline2-shallow", "large-base")
    )


def test_arms_vary_one_thing_each():
    arms = {a.name: a for a in build_arms(SMALL)}
    assert arms["shared"].config.ffn_sharing == "all"
    assert arms["group-2"].config.num_ffns == 4 and arms["group-4"].config.num_ffns == 2
    assert arms["shared-from-large-base"].init_from == "large-base"
    assert arms["shared-wide"].config.intermediate_size > SMALL.intermediate_size
    assert (
        arms["large-base"].parameters
        > arms["group-2"].parameters
        > arms["group-4"].parameters
        > arms["shared"].parameters
    )


def test_paper_scale_reproduces_the_papers_baseline_shapes():
    arms = {a.name: a.config for a in build_arms(get_preset("large-base-1.2b"))}
    assert arms["baseline1-thin"].hidden_size == 1024  # the paper: 22 layers x 1024
    assert arms["baseline2-shallow"].num_hidden_layers == 8  # the paper: 8 layers x 2048


def test_unmatchable_tolerance_is_a_clear_error():
    with pytest.raises(MobiLlamaError, match="cannot match baseline"):
        build_arms(get_preset("micro"), tolerance=1e-9)


def test_count_matches_for_tied_and_gqa():
    cfg = get_preset("micro").replace(tie_word_embeddings=True)
    assert count_parameters(cfg) == parameter_report(cfg)["parameters"]["total"]
