import json

import pytest

from mobillama.errors import MobiLlamaError
from mobillama.sft.formats import load_conversations
from mobillama.sft.instructions import build_pairs, write_instruction_set


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def test_three_formats_normalise_to_the_same_conversation(tmp_path):
    expected = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    files = {
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        "messages": {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
        },
        "alpaca": {"instruction": "Hi", "input": "", "output": "Hello!"},
    }
    for name, record in files.items():
        convs, report = load_conversations(write_jsonl(tmp_path / f"{name}.jsonl", [record]))
        assert convs == [expected] and report.kept == 1


def test_alpaca_input_joins_the_instruction(tmp_path):
    convs, _ = load_conversations(
        write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Sum", "input": "1 2", "output": "3"}])
    )
    assert convs[0][0]["content"] == "Sum\n\n1 2"


def test_json_array_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert len(load_conversations(tmp_path / "a.json")[0]) == 1


def test_bad_records_are_counted_skips_with_reasons(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    records = [
        good,
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
        "{not json",
        "[1, 2]",
        {"something": "else"},
    ]
    convs, report = load_conversations(write_jsonl(tmp_path / "m.jsonl", records))
    assert len(convs) == 1
    assert report.skipped == {
        "no assistant turn": 1,
        "unknown role 'wizard'": 1,
        "empty message": 1,
        "not a JSON object": 2,
        "unrecognised record format": 1,
    }
    assert report.examples["no assistant turn"] == [2]


def test_mixed_formats_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(
        tmp_path / "mix.jsonl",
        [{"instruction": "a", "output": "b"}, {"messages": [{"role": "user", "content": "q"}]}],
    )
    with pytest.raises(MobiLlamaError, match="line 2 is a messages record but the file is alpaca"):
        load_conversations(path)


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(MobiLlamaError, match="not found"):
        load_conversations(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(MobiLlamaError, match="no usable conversations"):
        load_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(MobiLlamaError, match="not UTF-8"):
        load_conversations(tmp_path / "bin.jsonl")


def test_stdlib_instruction_set_is_real_deterministic_and_split_by_function(tmp_path):
    pairs = build_pairs()
    assert len(pairs) > 300
    assert pairs == build_pairs()
    dumps = next(p for p in pairs if p["name"] == "json.dumps")
    assert "json.dumps" in dumps["messages"][0]["content"]
    assert dumps["messages"][1]["content"].startswith("`json.dumps(obj")
    assert "JSON" in dumps["messages"][1]["content"]
    train = {p["name"] for p in pairs if p["split"] == "train"}
    held = {p["name"] for p in pairs if p["split"] == "heldout"}
    assert held and not train & held
    counts = write_instruction_set(tmp_path / "set")
    assert counts["train"] == len(train) and counts["heldout"] == len(held)
    convs, report = load_conversations(tmp_path / "set" / "heldout.jsonl")
    assert len(convs) == len(held) and not report.skipped
