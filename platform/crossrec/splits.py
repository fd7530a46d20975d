"""Chronological leave-one-out splits per (user, domain), with cross-domain histories.

Protocol (DESIGN.md "Splits and evaluation"):
- each user's interactions are ordered by timestamp, ties in dataset order (the dataset is stored so);
- for each (user, domain) with at least `min_per_domain` interactions there, the last one in that domain is
  the test target and the one before it the validation target;
- a target's input history is every interaction of the user, in any domain, with a strictly earlier
  timestamp (equal timestamps are simultaneous: neither is in the other's history);
- training interactions are all the others; targets never reach training, neither as targets nor inside
  the sequences training sees (`train_sequences`).

Cold-start users (`protocol="cold-user"`, DESIGN.md): a seeded fraction (`cold_fraction`) of the users with
interactions in at least two domains is held out, chosen by a hash of (seed, user id) (never Python's salted
`hash`), and split again into validation and test users (the lower and upper half of the fraction). For a held-out
user and each domain they have other than the domain of their first interaction, every interaction in that
domain leaves training (as target and as history input); the target is their first interaction there and its
history is everything strictly before it (other domains only). Nothing else is a target under this protocol.

`domains` keeps only those domains' items and interactions (zero-shot training: the others never reach
training, not even as history). Which users are held out is decided on the whole dataset first, so a run on
some domains and an evaluation on all agree on the held-out users.

Items get global indices: domains in sorted order, item ids sorted (code-point order) within a domain, so
a domain's candidates are the contiguous block `offset[d] : offset[d] + n_items[d]`, and ties in ranking
are broken by item id order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from crossrec.dataset import Dataset

__all__ = ["Splits", "TargetBatch", "PROTOCOLS", "cold_user_roles", "protocol_info", "splits_for"]

PROTOCOLS = ("leave-one-out", "cold-user")


def _unit_hash(seed: int, user_ids: np.ndarray) -> np.ndarray:
    """A deterministic number in [0, 1) per user id: the first 8 bytes of sha256("seed:user_id")."""
    out = np.empty(len(user_ids), np.float64)
    for k, u in enumerate(user_ids):
        out[k] = int.from_bytes(hashlib.sha256(f"{seed}:{u}".encode()).digest()[:8], "big") / 2.0**64
    return out


def cold_user_roles(data: Dataset, fraction: float, seed: int) -> dict[str, tuple[str, str]]:
    """{user_id: (role, first_domain)} of the held-out users of the cold-user protocol: role "valid" or "test",
    first_domain the domain of their first interaction (by timestamp, ties in dataset order)."""
    inter = data.interactions
    users = inter.column("user_id").to_numpy(zero_copy_only=False).astype(str)
    doms = inter.column("domain").to_numpy(zero_copy_only=False).astype(str)
    ts = inter.column("timestamp").to_numpy().astype(np.int64)
    uniq, ucode = np.unique(users, return_inverse=True)
    ucode = ucode.reshape(-1)
    dnames, dcode = np.unique(doms, return_inverse=True)
    dcode = dcode.reshape(-1)
    o = np.lexsort((np.arange(len(ts)), ts, ucode))
    first = np.r_[True, ucode[o][1:] != ucode[o][:-1]]
    first_dom = np.empty(len(uniq), np.int64)
    first_dom[ucode[o][first]] = dcode[o][first]
    pairs = np.unique(ucode * len(dnames) + dcode)
    n_dom = np.bincount(pairs // len(dnames), minlength=len(uniq))
    eligible = np.flatnonzero(n_dom >= 2)
    h = _unit_hash(seed, uniq[eligible])
    out = {}
    for k, x in zip(eligible, h):
        if x < fraction:
            out[str(uniq[k])] = ("valid" if x < fraction / 2 else "test", str(dnames[first_dom[k]]))
    return out


def protocol_info(protocol: str, min_per_domain: int = 3, cold_fraction: float = 0.2, cold_seed: int = 0) -> dict:
    """The settings that decide which interactions are targets under `protocol` (and nothing else)."""
    if protocol == "cold-user":
        return {"protocol": protocol, "cold_fraction": float(cold_fraction), "cold_seed": int(cold_seed)}
    return {"protocol": protocol, "min_per_domain": int(min_per_domain)}


def splits_for(data: Dataset, cfg, training: bool = False) -> Splits:
    """The splits a TrainConfig's protocol defines on `data`; training=True also keeps only its `train_domains`
    (what training may see) and refuses a `behaviour.rating` that the data cannot feed."""
    splits = Splits(
        data,
        cfg.min_per_domain,
        protocol=cfg.protocol,
        cold_fraction=cfg.cold_fraction,
        cold_seed=cfg.cold_seed,
        domains=cfg.train_domains if training else None,
    )
    if training and cfg.behaviour.rating != "off" and (splits.row_rating is None or np.isnan(splits.row_rating).all()):
        # Evaluating such a bundle on unrated data is fine (it reads 'unknown'); training it on none learns nothing.
        raise ValueError(
            f"`behaviour.rating` is {cfg.behaviour.rating!r} but the dataset has no ratings "
            "(no `rating` column, or every value empty): set behaviour.rating=off"
        )
    return splits


@dataclass
class TargetBatch:
    """Targets of one domain handed to a scorer. The target item itself is not included."""

    domain: str
    rows: np.ndarray  # indices into Splits' interaction arrays
    user_ids: list[str]
    histories: list[np.ndarray]  # global item indices, chronological, all domains
    history_ts: list[np.ndarray]
    target_ts: np.ndarray
    history_ratings: list[np.ndarray] | None = None  # float per history item, NaN unrated; None: no ratings

    def __len__(self) -> int:
        return len(self.rows)


class Splits:
    """A dataset's interactions as arrays, with test/validation/training masks.

    Items: `item_ids`, `item_domain` (domain code), `item_row` (row in the dataset's items table) per global
    item index; `offset[d]`, `n_items[d]` the block of domain `d`; `domain_code[d]` its code.
    Interactions ("rows"), sorted by user then time: `row_user` (index into `users`), `row_item` (global item
    index), `row_time`, `row_domain` (domain code), `row_rating` (float32, NaN unrated; None when the dataset has
    no `rating` column), and the masks `is_test`, `is_valid`, `is_train`;
    `user_start[k]:user_start[k + 1]` are user k's rows.
    """

    def __init__(
        self,
        data: Dataset,
        min_per_domain: int = 3,
        protocol: str = "leave-one-out",
        cold_fraction: float = 0.2,
        cold_seed: int = 0,
        domains: list[str] | None = None,
    ):
        if min_per_domain < 2:
            raise ValueError(f"`min_per_domain` must be >= 2 (a test and a validation target), got {min_per_domain}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"`protocol` must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        if not 0 < cold_fraction < 1:
            raise ValueError(f"`cold_fraction` must be in (0, 1), got {cold_fraction!r}")
        self.min_per_domain = min_per_domain
        self.protocol = protocol
        self.cold_fraction = float(cold_fraction)
        self.cold_seed = int(cold_seed)
        self.data_hash = data.content_hash
        roles = cold_user_roles(data, cold_fraction, cold_seed) if protocol == "cold-user" else None
        items, inter = data.items, data.interactions
        kept_items = np.arange(items.num_rows)
        if domains is not None:
            all_domains = set(items.column("domain").to_pylist())
            for d in domains:
                if d not in all_domains:
                    raise ValueError(f"unknown domain {d!r} (domains: {', '.join(sorted(all_domains))})")
            keep = pa.array(list(domains), pa.string())
            mask = pc.is_in(items.column("domain"), value_set=keep)
            kept_items = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            items = items.filter(mask)
            inter = inter.filter(pc.is_in(inter.column("domain"), value_set=keep))
        item_ids = items.column("item_id").to_numpy(zero_copy_only=False).astype(str)
        item_dom = items.column("domain").to_numpy(zero_copy_only=False).astype(str)
        self.domains: list[str] = sorted(set(item_dom.tolist()))
        self.domain_code = {d: k for k, d in enumerate(self.domains)}
        # Global order: (domain, item_id). The dataset is stored in that order; sort again to not depend on it.
        order = np.lexsort((item_ids, item_dom))
        self.item_ids = item_ids[order]
        self.item_domain = np.array([self.domain_code[d] for d in item_dom[order]], dtype=np.int64)
        self.item_row = kept_items[order]  # row of data.items for each global index (titles, attributes, ...)
        self.offset = {d: int(np.searchsorted(self.item_domain, k)) for d, k in self.domain_code.items()}
        self.n_items = {d: int((self.item_domain == k).sum()) for d, k in self.domain_code.items()}
        index = {iid: k for k, iid in enumerate(self.item_ids)}

        users = inter.column("user_id").to_numpy(zero_copy_only=False).astype(str)
        ts = inter.column("timestamp").to_numpy().astype(np.int64)
        self.users, ucode = np.unique(users, return_inverse=True)
        ucode = ucode.reshape(-1)
        item = np.fromiter(
            (index[x] for x in inter.column("item_id").to_numpy(zero_copy_only=False)),
            dtype=np.int64,
            count=inter.num_rows,
        )
        o = np.lexsort((np.arange(len(ts)), ts, ucode))
        self.row_user, self.row_item, self.row_time = ucode[o], item[o], ts[o]
        self.row_rating: np.ndarray | None = None
        if "rating" in inter.column_names:
            rating = inter.column("rating").cast(pa.float32()).fill_null(float("nan")).to_numpy(zero_copy_only=False)
            self.row_rating = np.asarray(rating, np.float32)[o]
        self.row_domain = self.item_domain[self.row_item]
        n = len(self.row_user)
        self.user_start = np.searchsorted(self.row_user, np.arange(len(self.users) + 1))
        # Position counted from the end within each (user, domain): 0 = last (test), 1 = validation.
        key = self.row_user * len(self.domains) + self.row_domain
        o2 = np.lexsort((np.arange(n), key))
        k2 = key[o2]
        brk = np.flatnonzero(np.diff(k2)) + 1
        starts, ends = np.r_[0, brk], np.r_[brk, n]
        size = np.repeat(ends - starts, ends - starts)
        rev = np.repeat(ends, ends - starts) - 1 - np.arange(n)
        group_size, rev_pos = np.empty(n, np.int64), np.empty(n, np.int64)
        group_size[o2], rev_pos[o2] = size, rev
        if roles is None:
            ok = group_size >= min_per_domain
            self.is_test = ok & (rev_pos == 0)
            self.is_valid = ok & (rev_pos == 1)
            self.is_train = ~(self.is_test | self.is_valid)
        else:
            self._cold_user_masks(roles, group_size - 1 - rev_pos)
        # Rows are sorted by (user, ts): the first row of each run of equal (user, ts).
        n_idx = np.arange(n)
        new_run = np.r_[True, (self.row_user[1:] != self.row_user[:-1]) | (self.row_time[1:] != self.row_time[:-1])]
        self._first_simultaneous = np.maximum.accumulate(np.where(new_run, n_idx, 0))
        # Items ever seen in training, per global index (cold-item slice).
        self.train_count = np.bincount(self.row_item[self.is_train], minlength=len(self.item_ids))

    def _cold_user_masks(self, roles: dict[str, tuple[str, str]], pos_in_domain: np.ndarray) -> None:
        """is_train / is_valid / is_test of the cold-user protocol; pos_in_domain: 0 = the user's first row in
        that domain."""
        n_users = len(self.users)
        role = np.zeros(n_users, np.int8)  # 0 none, 1 valid, 2 test
        first = np.full(n_users, -1, np.int64)
        for k, u in enumerate(self.users):
            r = roles.get(str(u))
            if r is not None:
                role[k] = 1 if r[0] == "valid" else 2
                first[k] = self.domain_code.get(r[1], -1)  # -1: the first domain is not kept here
        r_role = role[self.row_user]
        hidden = (r_role > 0) & (self.row_domain != first[self.row_user])
        target = hidden & (pos_in_domain == 0)
        self.is_valid = target & (r_role == 1)
        self.is_test = target & (r_role == 2)
        self.is_train = ~hidden

    @property
    def protocol_info(self) -> dict:
        """What defines the targets: recorded in evaluation JSON, compared before evaluating a bundle."""
        return protocol_info(self.protocol, self.min_per_domain, self.cold_fraction, self.cold_seed)

    # -- targets ---------------------------------------------------------------------------------------
    def targets(self, split: str = "test", domain: str | None = None) -> np.ndarray:
        if split not in ("test", "valid"):
            raise ValueError(f"split must be 'test' or 'valid', got {split!r}")
        mask = self.is_test if split == "test" else self.is_valid
        if domain is not None:
            mask = mask & (self.row_domain == self.domain_code[self.check_domain(domain)])
        return np.flatnonzero(mask)

    def history_end(self, rows: np.ndarray) -> np.ndarray:
        """For each row, the end (exclusive) of its input history: the first row of the user with the
        same timestamp, so simultaneous interactions are excluded."""
        return self._first_simultaneous[np.asarray(rows)]

    def batch(self, rows: np.ndarray, domain: str) -> TargetBatch:
        ends = self.history_end(rows)
        starts = self.user_start[self.row_user[rows]]
        return TargetBatch(
            domain=domain,
            rows=rows,
            user_ids=[str(self.users[self.row_user[r]]) for r in rows],
            histories=[self.row_item[s:e] for s, e in zip(starts, ends)],
            history_ts=[self.row_time[s:e] for s, e in zip(starts, ends)],
            target_ts=self.row_time[rows],
            history_ratings=None if self.row_rating is None else [self.row_rating[s:e] for s, e in zip(starts, ends)],
        )

    # -- training ----------------------------------------------------------------------------------------
    def train_sequences(self) -> list[np.ndarray]:
        """Per user, the row indices of their training interactions, chronological (targets removed)."""
        rows = np.flatnonzero(self.is_train)
        cut = np.searchsorted(self.row_user[rows], np.arange(len(self.users) + 1))
        return [rows[cut[k] : cut[k + 1]] for k in range(len(self.users))]

    def check_domain(self, domain: str) -> str:
        if domain not in self.domain_code:
            raise ValueError(f"unknown domain {domain!r} (domains: {', '.join(self.domains)})")
        return domain
