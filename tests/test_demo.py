"""The demo's report card names each validation figure: the subset seen during training vs the full split."""

from mobillama.demo import render_report


def test_report_card_names_the_validation_subset_and_the_full_split():
    results = {
        "checkpoint": "runs/demo/run/checkpoints/step-00001200",
        "train": {"step": 1200, "tokens_seen": 2_457_600, "loss": 3.9, "val_loss": 3.77},
        "perplexity": {"loss": 4.08, "perplexity": 59.3, "bits_per_byte": 2.05, "tokens": 70_000},
        "validation_during_training": "fixed random subset of 64 of 420 validation rows",
        "unigram_entropy_nats": 6.17,
        "benchmarks": {"status": "skipped", "reason": "--eval-data skip"},
        "samples": [],
    }
    report = render_report(results, "loss.png")
    assert (
        "| validation loss, last evaluation during training (fixed random subset of 64 of 420 validation rows)"
        " | 3.770 |" in report
    )
    assert "| **validation loss, full split** (final checkpoint; nats/token) | 4.080 |" in report
    assert "validation points are the fixed random subset of 64 of 420 validation rows" in report
