import csv
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from crossrec.dataset import Dataset, prepare
from crossrec.schema import DataError
from crossrec_cli import main


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_prepare_csv_slice_counts_and_order(art_office, art_office_csv):
    ds = Dataset.load(art_office)
    inter, items = _rows(art_office_csv / "interactions.csv"), _rows(art_office_csv / "items.csv")
    c = ds.manifest["counts"]
    assert c["interactions"] == len(inter) == ds.interactions.num_rows
    assert c["items"] == len(items) == ds.items.num_rows
    assert c["users"] == len({r["user_id"] for r in inter})
    assert c["domains"]["arts"]["interactions"] == sum(r["domain"] == "arts" for r in inter)
    assert ds.domains == ["arts", "office"]
    assert ds.manifest["schema_version"] == 1 and len(ds.content_hash) == 64
    # A real row survives with its text: the first art-office item.
    got = ds.items
    first = next(r for r in items if r["item_id"] == "arts-00000")
    row = {
        k: v[0]
        for k, v in got.filter(got.column("item_id").to_numpy(zero_copy_only=False) == "arts-00000").to_pydict().items()
    }
    assert row["title"] == first["title"] and row["attributes"] == first["attributes"]
    # Stored sorted by (user, timestamp), ties in input order.
    users = ds.interactions.column("user_id").to_pylist()
    ts = ds.interactions.column("timestamp").to_pylist()
    assert all((u1, t1) <= (u2, t2) for u1, t1, u2, t2 in zip(users, ts, users[1:], ts[1:]))


def test_prepare_is_deterministic_and_refuses_to_overwrite(tmp_path, art_office_csv, art_office):
    out = tmp_path / "again"
    prepare([art_office_csv], out, progress=False)
    assert Dataset.load(out).content_hash == Dataset.load(art_office).content_hash
    with pytest.raises(DataError, match="already exists; pass --force"):
        prepare([art_office_csv], out, progress=False)
    prepare([art_office_csv], out, progress=False, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again"]  # no partial or old folders left


def _corrupt(tmp_path: Path, src: Path, fname: str, edit) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    lines = (dst / fname).read_text(encoding="utf-8").splitlines(keepends=True)
    (dst / fname).write_text("".join(edit(lines)), encoding="utf-8")
    return dst


def _swap_field(lines, row, col, value):
    header = lines[0].rstrip("\n").split(",")
    parts = next(csv.reader([lines[row]]))
    parts[header.index(col)] = value
    out = list(lines)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(parts)
    out[row] = buf.getvalue()
    return out


BAD_CASES = {
    # name: (file, edit, expected message)
    "missing column": (
        "interactions.csv",
        lambda ls: [",".join(x.rstrip("\n").split(",")[:3]) + "\n" for x in ls],
        r"interactions.csv: missing column 'timestamp'",
    ),
    "unknown domain": (
        "interactions.csv",
        lambda ls: _swap_field(ls, 5, "domain", "toys"),
        r"interactions.csv: column 'domain' row 5: unknown domain 'toys' \(domains in items: arts, office\)",
    ),
    "unknown item": (
        "interactions.csv",
        lambda ls: _swap_field(ls, 7, "item_id", "arts-99999"),
        r"interactions.csv: column 'item_id' row 7: item_id 'arts-99999' is not in the items",
    ),
    "wrong type": (
        "interactions.csv",
        lambda ls: _swap_field(ls, 3, "timestamp", "yesterday"),
        r"interactions.csv: column 'timestamp' row 3: expected an integer, got 'yesterday'",
    ),
    "empty file": ("items.csv", lambda ls: [], r"items.csv: file is empty"),
    "header only": ("interactions.csv", lambda ls: ls[:1], r"interactions.csv: file is empty \(no rows\)"),
    "empty id": (
        "interactions.csv",
        lambda ls: _swap_field(ls, 2, "user_id", ""),
        r"interactions.csv: column 'user_id' row 2: empty value",
    ),
    "duplicate item, other text": (
        "items.csv",
        lambda ls: ls + [_swap_field(ls, 1, "title", "another title")[1]],
        r"items.csv: column 'item_id' row \d+: item_id 'arts-\d+' appears again with "
        r"different title than at .*items.csv: row 1",
    ),
    "domain differs from item": (
        "interactions.csv",
        lambda ls: _swap_field(ls, 4, "domain", "office" if "arts" in ls[4] else "arts"),
        r"interactions.csv: column 'domain' row 4: domain '\w+' differs from item",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_refused_naming_file_column_row_and_leaves_nothing(case, tmp_path, art_office_csv, capsys):
    fname, edit, msg = BAD_CASES[case]
    src = _corrupt(tmp_path, art_office_csv, fname, edit)
    out = tmp_path / "out" / "ds"
    (tmp_path / "out").mkdir()
    rc = main(["prepare", str(src), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("crossrec prepare: error: ")
    assert re.search(msg, err), err
    assert list((tmp_path / "out").iterdir()) == []  # nothing half-written


def test_exact_duplicate_items_are_merged_and_counted(tmp_path, art_office_csv):
    src = _corrupt(tmp_path, art_office_csv, "items.csv", lambda ls: ls + [ls[3]])
    man = prepare([src], tmp_path / "ds", progress=False)
    assert man["report"]["duplicate_item_rows_merged"] == 1
    assert man["counts"]["items"] == len(_rows(art_office_csv / "items.csv"))


def _kitchen_platform(tmp_path, food_kitchen_csv, pick):
    """A copy of the slice where kitchen is a second platform with its own user ids (`k-` + id), and
    tmp_path/identity.csv maps the kitchen users `pick(sorted kitchen users)` back to their ids.
    Returns (source folder, the original rows, sorted kitchen users, food users)."""
    src = tmp_path / "src"
    shutil.copytree(food_kitchen_csv, src)
    rows = _rows(src / "interactions.csv")
    food_users = {r["user_id"] for r in rows if r["domain"] == "food"}
    kitchen_users = sorted({r["user_id"] for r in rows if r["domain"] == "kitchen"})
    renamed = [{**r, "user_id": "k-" + r["user_id"]} if r["domain"] == "kitchen" else r for r in rows]
    with open(src / "interactions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(renamed)
    with open(tmp_path / "identity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["platform", "platform_user_id", "user_id"])
        for u in pick(kitchen_users):
            w.writerow(["kitchen", "k-" + u, u])
    return src, rows, kitchen_users, food_users


def test_identity_table_unifies_users_across_platforms(tmp_path, food_kitchen_csv):
    # Pretend food and kitchen are two platforms with their own user ids: rename kitchen users, then
    # give an identity table that maps them back for half of them.
    src, rows, kitchen_users, _ = _kitchen_platform(tmp_path, food_kitchen_csv, lambda users: users[: len(users) // 2])
    mapped = kitchen_users[: len(kitchen_users) // 2]
    man = prepare([src], tmp_path / "ds", identity=tmp_path / "identity.csv", progress=False)
    ds = Dataset.load(tmp_path / "ds")
    users = set(ds.interactions.column("user_id").to_pylist())
    assert set(mapped) <= users
    assert "kitchen:k-" + kitchen_users[-1] in users  # unmapped users are namespaced by platform
    n_kitchen = sum(r["domain"] == "kitchen" for r in rows)
    assert man["report"]["identity"]["interactions_unmapped"] + man["report"]["identity"]["interactions_mapped"] == len(
        rows
    )
    assert man["report"]["identity"]["interactions_unmapped"] < len(rows) and n_kitchen > 0
    assert (tmp_path / "ds" / "identity.parquet").is_file()


def test_identity_canonical_platform_merges_users_across_platforms(tmp_path, food_kitchen_csv, capsys):
    """Kitchen is a second platform with its own user ids; food's ids are the unified ids (canonical). The identity
    table lists every other kitchen user: exactly those of them who also use food become one user on both."""
    from crossrec_cli import main

    src, _, kitchen_users, food_users = _kitchen_platform(tmp_path, food_kitchen_csv, lambda users: users[::2])
    mapped = kitchen_users[::2]  # every other kitchen user is listed
    expected = sorted(set(mapped) & food_users)
    assert expected  # the slice has users of both domains among the mapped half

    def both_platforms(path):
        inter = Dataset.load(path).interactions
        doms: dict[str, set] = {}
        for u, d in zip(inter.column("user_id").to_pylist(), inter.column("domain").to_pylist()):
            doms.setdefault(u, set()).add(d)
        return sorted(u for u, ds in doms.items() if len(ds) > 1)

    # Without a canonical platform, food's unlisted users are namespaced: nobody merges.
    man = prepare([src], tmp_path / "plain", identity=tmp_path / "identity.csv", progress=False)
    assert man["report"]["identity"]["users_on_2_or_more_platforms"] == 0 and both_platforms(tmp_path / "plain") == []
    # With food canonical, the mapped kitchen users are the food users of the same id: exactly those merge.
    argv = ["prepare", str(src), "--out", str(tmp_path / "ds"), "--identity", str(tmp_path / "identity.csv")]
    assert main([*argv, "--identity-canonical", "food", "--quiet"]) == 0
    assert both_platforms(tmp_path / "ds") == expected
    man = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert man["report"]["identity"]["users_on_2_or_more_platforms"] == len(expected)
    assert man["report"]["identity"]["canonical_platforms"] == ["food"]
    assert f"{len(expected):,} users on 2 or more platforms after the merge" in capsys.readouterr().out
    # A platform that is not in the data, or a canonical platform without an identity table: one clear line.
    assert main([*argv[:3], str(tmp_path / "x"), *argv[4:], "--identity-canonical", "fod", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--identity-canonical: unknown platform 'fod' (platforms: food, kitchen)" in err
    assert main(["prepare", str(src), "--out", str(tmp_path / "y"), "--identity-canonical", "food", "--quiet"]) == 2
    assert "--identity-canonical needs --identity" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_identity_conflict_is_refused(tmp_path, food_kitchen_csv):
    (tmp_path / "identity.csv").write_text("platform,platform_user_id,user_id\nfood,u000001,a\nfood,u000001,b\n")
    with pytest.raises(DataError, match=r"identity.csv: column 'user_id' row 2: food/u000001 is mapped to 'b'"):
        prepare([food_kitchen_csv], tmp_path / "ds", identity=tmp_path / "identity.csv", progress=False)
    assert not (tmp_path / "ds").exists()


def test_vendored_datasets_match_the_shared_counts():
    from conftest import REPO

    fk = json.loads((REPO / "data/amazon-food-kitchen/manifest.json").read_text())["counts"]
    ao = json.loads((REPO / "data/amazon-art-office/manifest.json").read_text())["counts"]
    assert (fk["users"], fk["items"], fk["interactions"]) == (53061, 36298, 436127)
    assert (ao["users"], ao["items"], ao["interactions"]) == (9577, 38396, 208541)
    assert fk["domains"]["food"]["items"] == 8661 and ao["domains"]["office"]["interactions"] == 97664
