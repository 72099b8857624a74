"""Vision stages driven by the project's training loop (mobillama.train.loop)."""

from __future__ import annotations

import json


def test_stage1_and_stage2_through_the_loop(tmp_path, tiny_model, tokenizer, shapes_dir):
    from mobillama.vision.model import MobiLlamaV
    from mobillama.vision.train import run_stage

    tokenizer.save_pretrained(tmp_path / "tok")
    tiny_model.save_pretrained(tmp_path / "v0", tokenizer_dir=tmp_path / "tok")
    s1 = run_stage(
        tmp_path / "v0",
        1,
        shapes_dir / "captions.jsonl",
        tmp_path / "run1",
        max_steps=3,
        micro_batch_size=4,
        device="cpu",
        val_fraction=0.25,
    )
    assert s1["step"] == 3 and s1["val_loss"] is not None
    m1 = MobiLlamaV.from_pretrained(s1["checkpoint"])
    m0 = MobiLlamaV.from_pretrained(tmp_path / "v0")
    # stage 1 moved the projector and nothing else
    for (name, a), b in zip(m0.named_parameters(), m1.parameters()):
        assert (not (a == b).all()) == name.startswith("projector."), name
    (shapes_dir / "llava.json").write_text(
        json.dumps(
            [
                {
                    "id": i,
                    "image": f"{c}_circle.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is in the picture?"},
                        {"from": "gpt", "value": f"a {c} circle"},
                    ],
                }
                for i, c in enumerate(["red", "green", "blue", "yellow"])
            ]
        )
    )
    s2 = run_stage(
        s1["checkpoint"],
        2,
        shapes_dir / "llava.json",
        tmp_path / "run2",
        max_steps=2,
        micro_batch_size=2,
        device="cpu",
        val_fraction=0.0,
    )
    m2 = MobiLlamaV.from_pretrained(s2["checkpoint"])
    changed = {
        n.split(".")[0] for (n, a), b in zip(m1.named_parameters(), m2.parameters()) if not (a == b).all()
    }
    assert changed == {"projector", "decoder"}
