import pytest

from mobillama.config import get_preset
from mobillama.info import parameter_report


@pytest.mark.parametrize(
    ("preset", "millions"),
    [("mobillama-0.5b", 534.9), ("mobillama-0.8b", 819.3), ("large-base-1.2b", 1261.5)],
)
def test_preset_parameter_counts_match_the_paper(preset, millions):
    total = parameter_report(get_preset(preset))["parameters"]["total"]
    assert abs(total / 1e6 - millions) / millions < 1e-3


def test_matched_baselines_are_about_half_a_billion():
    for preset in ("baseline1-0.5b", "baseline2-0.5b"):
        total = parameter_report(get_preset(preset))["parameters"]["total"]
        assert 0.52e9 < total < 0.56e9


def test_report_parts_add_up_and_sharing_saving():
    r = parameter_report(get_preset("mobillama-0.5b"))
    p = r["parameters"]
    assert p["embeddings"] + p["attention"] + p["ffn"] + p["norms"] + p["lm_head"] == p["total"]
    assert p["ffn"] == 3 * 2048 * 5632  # stored once
    assert r["unshared_total"] == parameter_report(get_preset("large-base-1.2b"))["parameters"]["total"]
    assert r["bytes"]["bf16"] == 2 * p["total"]


def test_tied_head_counts_once():
    cfg = get_preset("micro").replace(tie_word_embeddings=True)
    assert parameter_report(cfg)["parameters"]["lm_head"] == 0
