"""Every ingest format read from a real slice (auto-detected and named), validated, and checked against the source."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossrec.ingest import Source, detect_format, read_source
from crossrec.schema import DataError, validate_interactions, validate_items

DATA = Path(__file__).parent / "data"
FOOD_KITCHEN = DATA / "amazon-food-kitchen-mini"
ART_OFFICE = DATA / "amazon-art-office-mini"
RECBOLE = DATA / "recbole-mini"
AMAZON = DATA / "amazon2023-mini"
JSONL = DATA / "jsonl-mini"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def validated(source: Source) -> tuple[pa.Table, pa.Table]:
    items, _ = validate_items(source.items)
    return items, validate_interactions(source.interactions, items)


def read_both(path: Path, fmt: str, domain: str | None = None) -> tuple[pa.Table, pa.Table, Source]:
    """Reads `path` auto-detected and with `fmt` named; both must give the same tables."""
    assert detect_format(path) == fmt
    auto, named = read_source(path, "auto", domain), read_source(path, fmt, domain)
    items, inters = validated(auto)
    items2, inters2 = validated(named)
    assert items.equals(items2) and inters.equals(inters2)
    assert auto.skipped == named.skipped
    return items, inters, auto


def per_domain(table: pa.Table) -> Counter[str]:
    return Counter(table.column("domain").to_pylist())


def histories(table: pa.Table) -> dict[str, list[tuple[int, str]]]:
    """user -> [(timestamp, item)] in table order."""
    out: dict[str, list[tuple[int, str]]] = {}
    for u, i, t in zip(*(table.column(c).to_pylist() for c in ("user_id", "item_id", "timestamp"))):
        out.setdefault(u, []).append((t, i))
    return out


def assert_monotone(table: pa.Table) -> None:
    """Timestamps never decrease along each user's rows of one domain (adapters read domains one at a time)."""
    last: dict[tuple[str, str], int] = {}
    for key, t in zip(
        zip(table.column("user_id").to_pylist(), table.column("domain").to_pylist()),
        table.column("timestamp").to_pylist(),
    ):
        assert t >= last.get(key, t), key
        last[key] = t


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


# --- RecBole / UniSRec ---------------------------------------------------------------------------------------------


def test_recbole_item_and_unisrec_text_folder_matches_source() -> None:
    items, inters, source = read_both(RECBOLE, "recbole")
    src_items, src_inters = read_csv(FOOD_KITCHEN / "items.csv"), read_csv(FOOD_KITCHEN / "interactions.csv")
    assert per_domain(items) == Counter(r["domain"] for r in src_items) == {"food": 679, "kitchen": 2319}
    assert per_domain(inters) == Counter(r["domain"] for r in src_inters)
    assert source.skipped == {"history_rows_merged": 0}
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    assert titles["9742356831"] == "Mae Ploy Thai Green Curry Paste - 14 oz jar"  # food.item
    # kitchen.text's `text` is the title; the tab the source title held became a space (TSV has no quoting).
    assert titles["B006406DPQ"].startswith(
        "Canvas Prints - Framed and Ready to Hang - 100% Quality Cotton Canvas - Free Shipping"
    )
    assert_monotone(inters)
    # food.inter keeps the source's timestamps; the UniSRec sequence form gets ordinals 0..n-1 in source order.
    food_ids = {r["item_id"] for r in src_items if r["domain"] == "food"}
    got = histories(inters)
    want: dict[str, list[tuple[int, str]]] = {}
    for r in src_inters:
        want.setdefault(r["user_id"], []).append((int(r["timestamp"]), r["item_id"]))
    assert set(got) == set(want)
    for user, hist in want.items():
        kitchen = [i for _, i in sorted(hist) if i not in food_ids]
        assert [p for p in got[user] if p[1] in food_ids] == [p for p in hist if p[1] in food_ids]
        assert [p for p in got[user] if p[1] not in food_ids] == list(enumerate(kitchen))


def test_recbole_one_inter_file_with_domain() -> None:
    source = read_source(RECBOLE / "food.inter", "auto", domain="grocery")
    items, inters = validated(source)
    assert set(items.column("domain").to_pylist()) == set(inters.column("domain").to_pylist()) == {"grocery"}
    assert items.num_rows == 679 and inters.num_rows == 797


def test_recbole_any_column_order_float_timestamps_and_extra_item_columns(tmp_path: Path) -> None:
    src_items, src_inters = read_csv(ART_OFFICE / "items.csv"), read_csv(ART_OFFICE / "interactions.csv")
    arts_items = [r for r in src_items if r["domain"] == "arts"]
    arts = [r for r in src_inters if r["domain"] == "arts"]
    write_tsv(
        tmp_path / "arts.inter",
        ["item_id:token", "timestamp:float", "user_id:token"],
        [[r["item_id"], f"{r['timestamp']}.0", r["user_id"]] for r in arts],
    )
    write_tsv(
        tmp_path / "arts.item",
        ["title:token_seq", "attributes:token_seq", "item_id:token"],
        [[r["title"], r["attributes"], r["item_id"]] for r in arts_items],
    )
    items, inters = validated(read_source(tmp_path, "recbole"))
    assert items.column_names == ["item_id", "domain", "title", "attributes"]
    assert items.num_rows == len(arts_items) and inters.num_rows == len(arts)
    first = items.slice(0, 1).to_pylist()[0]
    assert first == {
        "item_id": "arts-00000",
        "domain": "arts",
        "title": "fletcher terry co framers stacked points 08 950 silver 5 8 in",
        "attributes": "arts crafts sewing crafting picture framing fletcher terry",
    }
    assert inters.column("timestamp").type == pa.int64()
    assert inters.column("timestamp").to_pylist() == [int(r["timestamp"]) for r in arts]


def test_recbole_without_timestamp_uses_row_order_per_user(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "food.item", tmp_path)
    rows = [line.split("\t")[:2] for line in (RECBOLE / "food.inter").read_text().splitlines()[1:]]
    write_tsv(tmp_path / "food.inter", ["user_id:token", "item_id:token"], rows)
    _, inters = validated(read_source(tmp_path, "auto"))
    ordinals: Counter[str] = Counter()
    for u, t in zip(inters.column("user_id").to_pylist(), inters.column("timestamp").to_pylist()):
        assert t == ordinals[u]
        ordinals[u] += 1
    assert inters.num_rows == 797


def test_unisrec_augmented_prefix_rows_merge_into_one_history(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "kitchen.text", tmp_path)
    rows, extra = [], 0
    for line in (RECBOLE / "kitchen.inter").read_text().splitlines()[1:]:
        user, hist, target = line.split("\t")
        seq = hist.split() + [target]
        # UniSRec's train file: one row per prefix, the longest first.
        for end in range(len(seq), 0, -1):
            rows.append([user, " ".join(seq[: end - 1]), seq[end - 1]])
        extra += len(seq) - 1
    write_tsv(tmp_path / "kitchen.inter", ["user_id:token", "item_id_list:token_seq", "item_id:token"], rows)
    source = read_source(tmp_path, "recbole")
    _, inters = validated(source)
    _, want = validated(read_source(RECBOLE / "kitchen.inter", "recbole"))
    assert extra > 0 and source.skipped == {"history_rows_merged": extra}
    assert inters.equals(want)


def test_unisrec_histories_that_are_not_prefixes_are_refused(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "kitchen.text", tmp_path)
    lines = (RECBOLE / "kitchen.inter").read_text().splitlines()
    user, hist, target = lines[1].split("\t")
    other = lines[2].split("\t")
    write_tsv(tmp_path / "kitchen.inter", lines[0].split("\t"), [[user, hist, target], [user, other[1], other[2]]])
    with pytest.raises(DataError, match=r"kitchen\.inter: row 2: user 'u005591' has another history at row 1"):
        read_source(tmp_path, "recbole")


def test_recbole_inter_without_item_id_names_file_and_column(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "food.item", tmp_path)
    write_tsv(tmp_path / "food.inter", ["user_id:token", "timestamp:float"], [["u000001", "0"]])
    with pytest.raises(
        DataError,
        match=r"food\.inter: missing column 'item_id' \(required: user_id, item_id "
        r"\(or item_id_list\); found: user_id, timestamp\)",
    ):
        read_source(tmp_path, "auto")


def test_recbole_inter_without_user_id_names_file_and_column(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "food.item", tmp_path)
    write_tsv(tmp_path / "food.inter", ["item_id:token", "timestamp:float"], [["B000BIZT3E", "0"]])
    with pytest.raises(DataError, match=r"food\.inter: missing column 'user_id'"):
        read_source(tmp_path, "recbole")


def test_recbole_bad_rows_are_named(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "food.item", tmp_path)
    lines = (RECBOLE / "food.inter").read_text().splitlines()
    (tmp_path / "food.inter").write_text("\n".join(lines[:3] + [lines[3] + "\textra"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"food\.inter: row 3: expected 3 tab-separated fields"):
        read_source(tmp_path, "recbole")
    (tmp_path / "food.inter").write_text("\n".join(lines[:3] + [lines[3] + ".5"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"food\.inter: column 'timestamp' row 3: expected an integer, got .*2\.5"):
        validated(read_source(tmp_path, "recbole"))
    (tmp_path / "food.inter").write_text("\n".join(lines[:3] + [lines[3] + "x"] + lines[4:]) + "\n")
    with pytest.raises(DataError, match=r"food\.inter: column 'timestamp' row 3: expected a number, got '2x'"):
        read_source(tmp_path, "recbole")


def test_recbole_needs_item_text_and_one_domain_for_domain_option(tmp_path: Path) -> None:
    shutil.copy(RECBOLE / "food.inter", tmp_path)
    with pytest.raises(
        DataError,
        match=r"food\.inter: no item text; expected food\.item \(RecBole\) or "
        r"food\.text \(UniSRec\)",
    ):
        read_source(tmp_path, "recbole")
    with pytest.raises(DataError, match=r"--domain 'x' was given but the folder holds 2 datasets \(food, kitchen\)"):
        read_source(RECBOLE, "recbole", domain="x")


# --- Amazon Reviews 2023 -------------------------------------------------------------------------------------------

CATEGORIES = {"arts_crafts_and_sewing": "Arts_Crafts_and_Sewing", "office_products": "Office_Products"}


def test_amazon2023_folder_matches_files_and_counts_reviews_without_meta() -> None:
    items, inters, source = read_both(AMAZON, "amazon2023")
    meta = {d: read_jsonl(AMAZON / f"meta_{c}.jsonl") for d, c in CATEGORIES.items()}
    reviews = {d: read_jsonl(AMAZON / f"{c}.jsonl") for d, c in CATEGORIES.items()}
    no_meta = [
        r
        for rs in reviews.values()
        for r in rs
        if r["parent_asin"] not in {m["parent_asin"] for ms in meta.values() for m in ms}
    ]
    assert [r["parent_asin"] for r in no_meta] == ["office-08304"]
    assert source.skipped == {"reviews_without_meta": 1}
    assert per_domain(items) == {d: len(ms) for d, ms in meta.items()}
    assert per_domain(inters) == {d: len(rs) - (d == "office_products") for d, rs in reviews.items()}
    assert "office-08304" not in set(inters.column("item_id").to_pylist())
    # Every meta row is an item, reviewed or not (the fixture keeps a few never reviewed).
    assert set(items.column("item_id").to_pylist()) > set(inters.column("item_id").to_pylist())
    # Text comes from the real slice: title as is, the attributes as the one-entry categories list.
    src = {r["item_id"]: r for r in read_csv(ART_OFFICE / "items.csv")}
    for row in items.to_pylist():
        assert row["title"] == src[row["item_id"]]["title"]
        assert row["categories"] == src[row["item_id"]]["attributes"]
        assert row["brand"] == row["description"] == row["features"] == ""
    assert inters.column("timestamp").type == pa.int64()
    assert min(inters.column("timestamp").to_pylist()) == 1_600_000_000_000
    assert "rating" not in inters.column_names  # the slice has no ratings
    assert_monotone(inters)


def test_amazon2023_gzip_and_single_category(tmp_path: Path) -> None:
    for f in AMAZON.iterdir():
        with open(f, "rb") as src, gzip.open(tmp_path / f"{f.name}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    items, inters, source = read_both(tmp_path, "amazon2023")
    want_items, want_inters = validated(read_source(AMAZON, "amazon2023"))
    assert items.equals(want_items) and inters.equals(want_inters)
    assert source.skipped == {"reviews_without_meta": 1}
    # One reviews file: only its category, under --domain if given.
    items, inters, source = read_both(tmp_path / "Arts_Crafts_and_Sewing.jsonl.gz", "amazon2023", domain="arts")
    assert per_domain(items) == {"arts": len(read_jsonl(AMAZON / "meta_Arts_Crafts_and_Sewing.jsonl"))}
    assert per_domain(inters) == {"arts": len(read_jsonl(AMAZON / "Arts_Crafts_and_Sewing.jsonl"))}
    assert source.skipped == {"reviews_without_meta": 0}


def test_amazon2023_full_meta_fields_become_text_columns(tmp_path: Path) -> None:
    # The real slice has no description/features/store: this row reuses its item's real text in those fields
    # to check how lists are joined and long descriptions cut.
    meta = read_jsonl(AMAZON / "meta_Arts_Crafts_and_Sewing.jsonl")
    first = meta[0]
    first.update(
        store="fletcher terry",
        features=[first["title"], first["categories"][0]],
        description=[first["title"]] * 30,
        categories=["Arts, Crafts & Sewing", "Crafting", None],
        details={"Brand": "fletcher terry"},
        price=None,
        images=[],
        videos=[],
    )
    with open(tmp_path / "meta_Arts_Crafts_and_Sewing.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in meta)
    shutil.copy(AMAZON / "Arts_Crafts_and_Sewing.jsonl", tmp_path)
    items, _ = validated(read_source(tmp_path, "auto"))
    row = items.slice(0, 1).to_pylist()[0]
    assert row["categories"] == "Arts, Crafts & Sewing > Crafting"
    assert row["brand"] == "fletcher terry"
    assert row["features"] == first["title"] + " arts crafts sewing crafting picture framing fletcher terry"
    full = " ".join([first["title"]] * 30)
    assert 900 < len(row["description"]) <= 1000 and full.startswith(row["description"])
    assert full[len(row["description"])] == " "  # cut at a word boundary


def test_amazon2023_bad_lines_are_named(tmp_path: Path) -> None:
    shutil.copy(AMAZON / "meta_Office_Products.jsonl", tmp_path)
    lines = (AMAZON / "Office_Products.jsonl").read_text().splitlines()
    reviews = tmp_path / "Office_Products.jsonl"
    reviews.write_text("\n".join(lines[:4] + [lines[4][:-1]] + lines[5:]) + "\n")
    with pytest.raises(DataError, match=r"Office_Products\.jsonl: row 5: not valid JSON"):
        read_source(tmp_path, "amazon2023")
    bad = json.loads(lines[4])
    del bad["user_id"]
    reviews.write_text("\n".join(lines[:4] + [json.dumps(bad)] + lines[5:]) + "\n")
    with pytest.raises(
        DataError,
        match=r"Office_Products\.jsonl: column 'user_id' row 5: expected a non-empty "
        r"string, got None",
    ):
        read_source(tmp_path, "amazon2023")
    bad = json.loads(lines[4]) | {"timestamp": "2020-09-13"}
    reviews.write_text("\n".join(lines[:4] + [json.dumps(bad)] + lines[5:]) + "\n")
    with pytest.raises(DataError, match=r"column 'timestamp' row 5: expected an integer \(ms\), got '2020-09-13'"):
        read_source(tmp_path, "amazon2023")
    (tmp_path / "Office_Products.jsonl.gz").write_bytes(b"not gzip")
    reviews.unlink()
    with pytest.raises(DataError, match=r"Office_Products\.jsonl\.gz: cannot read"):
        read_source(tmp_path, "amazon2023")


def test_amazon2023_category_without_meta_is_refused(tmp_path: Path) -> None:
    for f in AMAZON.iterdir():
        shutil.copy(f, tmp_path)
    (tmp_path / "meta_Office_Products.jsonl").unlink()
    assert detect_format(tmp_path) == "amazon2023"  # the arts pair is still there
    with pytest.raises(DataError, match=r"Office_Products\.jsonl: no meta_Office_Products\.jsonl\[\.gz\] next to it"):
        read_source(tmp_path, "amazon2023")
    with pytest.raises(DataError, match=r"--domain 'x' was given but the folder holds 2 categories"):
        read_source(AMAZON, "amazon2023", domain="x")


# --- crossrec's own schema: JSONL, Parquet, CSV --------------------------------------------------------------------


def test_jsonl_folder_matches_files() -> None:
    items, inters, _ = read_both(JSONL, "jsonl")
    src_items, src_inters = read_jsonl(JSONL / "items.jsonl"), read_jsonl(JSONL / "interactions.jsonl")
    assert items.num_rows == len(src_items) and inters.num_rows == len(src_inters)
    assert per_domain(items) == Counter(r["domain"] for r in src_items)
    assert set(per_domain(inters)) == {"arts", "office"}
    assert items.to_pylist()[0] == read_csv(ART_OFFICE / "items.csv")[0]
    assert_monotone(inters)


def test_parquet_folder_from_csv_slice(tmp_path: Path) -> None:
    for name in ("items", "interactions"):
        rows = read_csv(FOOD_KITCHEN / f"{name}.csv")
        if name == "interactions":
            rows = [{**r, "timestamp": int(r["timestamp"])} for r in rows]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / f"{name}.parquet")
    items, inters, _ = read_both(tmp_path, "parquet")
    assert per_domain(items) == {"food": 679, "kitchen": 2319}
    assert per_domain(inters) == Counter(r["domain"] for r in read_csv(FOOD_KITCHEN / "interactions.csv"))
    titles = dict(zip(items.column("item_id").to_pylist(), items.column("title").to_pylist()))
    assert titles["B00004S1C5"] == "Ateco Food Coloring Kit, 6 colors"
    assert_monotone(inters)


def test_csv_folder() -> None:
    items, inters, _ = read_both(ART_OFFICE, "csv")
    assert per_domain(items) == {"arts": 1544, "office": 1356}
    assert per_domain(inters) == {"arts": 1813, "office": 1639}
    assert items.column_names == ["item_id", "domain", "title", "attributes"]
    assert_monotone(inters)
