"""The shared data loader: every format, dataset cards, seeded calibration draws and clear errors."""

import json

import numpy as np
import pytest

from compressor.checkpoint import load_tokenizer
from compressor.data import CalibrationConfig, DataConfig, calibration_batches, card_names, load_card, read
from compressor.errors import UserError
from compressor.recipe import parse_recipe

ROWS = [{"text": f"the film number {i} was {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(40)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "rows.csv").write_text("text,label\n" + "".join(f"\"{r['text']}\",{r['label']}\n" for r in ROWS))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), folder / "rows.parquet")
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(folder / "flat"))
    DatasetDict({"train": Dataset.from_list(ROWS[:30]), "validation": Dataset.from_list(ROWS[30:])}).save_to_disk(
        str(folder / "splits"))
    (folder / "doc.txt").write_text("first line of one\nparagraph\n\nsecond paragraph here\n\n\nthird\n")
    return folder


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet", "flat"])
def test_every_format_reads_the_same_rows(files, name):
    samples = read(DataConfig(path=str(files / name)))
    assert samples.texts == [r["text"] for r in ROWS]
    assert samples.labels == [r["label"] for r in ROWS]


def test_dataset_dict_split(files):
    assert len(read(DataConfig(path=str(files / "splits"))).texts) == 30  # train by default
    assert read(DataConfig(path=str(files / "splits"), split="validation")).texts == [r["text"] for r in ROWS[30:]]
    with pytest.raises(UserError, match="splits train, validation"):
        read(DataConfig(path=str(files / "splits"), split="test"))


def test_text_lines_and_paragraphs(files):
    assert read(DataConfig(path=str(files / "doc.txt"))).texts == ["first line of one", "paragraph",
                                                                   "second paragraph here", "third"]
    assert read(DataConfig(path=str(files / "doc.txt"), segment="paragraph")).texts == [
        "first line of one paragraph", "second paragraph here", "third"]


def test_errors_name_the_file_and_field(files, tmp_path):
    with pytest.raises(UserError, match="no field 'sentence'.*set text_field"):
        read(DataConfig(path=str(files / "rows.jsonl"), text_field="sentence"))
    with pytest.raises(UserError, match="no column 'sentence'"):
        read(DataConfig(path=str(files / "rows.parquet"), text_field="sentence"))
    with pytest.raises(UserError, match="data file not found"):
        read(DataConfig(path=str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: no samples"):
        read(DataConfig(path=str(tmp_path / "empty.jsonl")))
    (tmp_path / "bad.csv").write_text("text,label\nhello,positive\n")
    with pytest.raises(UserError, match="label 'positive' in 'label' is not an integer"):
        read(DataConfig(path=str(tmp_path / "bad.csv")))
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(UserError, match="set `format`"):
        read(DataConfig(path=str(tmp_path / "data.xml")))


def test_cards_name_source_checksum_and_licence():
    assert {"sentiment-train", "sentiment-test", "lee-background", "lee-test", "enwiki-sample"} <= set(card_names())
    for name in card_names():
        card = load_card(name)
        assert card["name"] == name
        assert card["source"]["fixture"] and card["source"]["origin"] and card["licence"]
        assert len(card["sha256"]) == 64


def test_unknown_card_is_a_recipe_error_with_line():
    text = """name: x
task: text-classification
stages: [{type: export_onnx}]
evaluation:
  data:
    dataset: imdb
goals: {size: {max_ratio: 1}}
"""
    with pytest.raises(UserError, match=r"r.yaml:5: evaluation.data: .*no dataset card 'imdb'"):
        parse_recipe(text, "r.yaml")


def _ids(batches):
    return [tuple(row[row != 0]) for feed in batches for row in feed["input_ids"]]


def test_calibration_draw_is_seeded(files, tiny_classifier):
    tokenizer = load_tokenizer(tiny_classifier)
    data = DataConfig(path=str(files / "rows.jsonl"))
    first = calibration_batches(CalibrationConfig(data=data, samples=16, seed=3), tokenizer)
    again = calibration_batches(CalibrationConfig(data=data, samples=16, seed=3), tokenizer)
    other = calibration_batches(CalibrationConfig(data=data, samples=16, seed=4), tokenizer)
    assert _ids(first) == _ids(again) and len(first) == 16
    assert _ids(first) != _ids(other)
    with pytest.raises(UserError, match="calibration.samples is 41 but it holds only 40"):
        calibration_batches(CalibrationConfig(data=data, samples=41), tokenizer)


def test_calibration_padding_and_buckets(files, tiny_classifier):
    tokenizer = load_tokenizer(tiny_classifier)
    data = DataConfig(path=str(files / "rows.jsonl"))
    fixed = calibration_batches(CalibrationConfig(data=data, samples=12, batch_size=4, padding="max_length",
                                                  max_length=48), tokenizer)
    assert [f["input_ids"].shape for f in fixed] == [(4, 48)] * 3
    bucketed = calibration_batches(CalibrationConfig(data=data, samples=12, batch_size=4, padding="bucket"), tokenizer)
    lengths = [int(m.sum()) for f in bucketed for m in f["attention_mask"]]
    assert lengths == sorted(lengths)


def test_calibration_token_windows(text_file, tiny_llama):
    tokenizer = load_tokenizer(tiny_llama)
    data = DataConfig(path=str(text_file), segment="window")
    batches = calibration_batches(CalibrationConfig(data=data, samples=6, max_length=32, batch_size=2), tokenizer)
    assert [b["input_ids"].shape for b in batches] == [(2, 32)] * 3
    assert all(np.all(b["attention_mask"] == 1) for b in batches)
    with pytest.raises(UserError, match="holds only .* windows of 32 tokens"):
        calibration_batches(CalibrationConfig(data=data, samples=10_000, max_length=32), tokenizer)


def test_wikitext_is_reduced_to_plain_paragraphs():
    from compressor.fixtures import wikitext_paragraphs

    article = """{{Infobox country|name=Algeria|capital=[[Algiers]]}}
'''Algeria''' is a country in the [[Maghreb]] region of [[North Africa|Northern Africa]], its capital is Algiers.<ref name="x">{{cite web|url=http://a}}</ref>
[[File:Flag.svg|thumb|The [[flag]] of Algeria]]
== History and early settlement of the region ==
{| class="wikitable"
| cell || cell
|}
* The country has the largest area in Africa since the division of Sudan in 2011, &amp;nbsp;by far.
Short line.
[[Category:Countries]]"""
    assert wikitext_paragraphs(article) == [
        "Algeria is a country in the Maghreb region of Northern Africa, its capital is Algiers.",
        "The country has the largest area in Africa since the division of Sudan in 2011,  by far."]
