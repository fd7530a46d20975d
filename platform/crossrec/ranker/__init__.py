"""Second stage: re-ranks the retriever's top-N with a small MLP over per-(user, candidate) features.

    score'(u, c) = a * retrieval(u, c) + MLP([features(u, c), domain embedding])

The MLP's last layer starts at zero and `a` at one, so an untrained ranker keeps retrieval's order and
training (listwise softmax over the top-N: the retriever's hard negatives) only has to learn corrections.
Features (FEATURES) use only what serving has at request time - the model's item vectors of the candidates and
of the history, the retrieval scores, the user vector - plus a per-item table saved with the ranker (log
popularity in the training data, knowledge-graph rows). Items the ranker never saw score with zero popularity
and no graph links, never an error. The retrieval scores include the retriever's priors
(crossrec.priors), in training lists, evaluation and serving alike: they are the scores that chose the top-N,
and an untrained ranker then keeps exactly retrieval's order.

Training data (`build_lists`): the VALIDATION targets. The retriever was fit on the training sequences, so its
scores there are optimistic (the targets were its positives); on validation targets its top-N looks like it
will at test time. Validation users are split: `valid_fraction` of them are held out for early stopping.
Test targets are never used. Plain PyTorch: the Ray Train driver is `trainers/ranker.py`.

One module per concept: `features.py` (the features and the per-item table), `net.py` (RankerNet), `lists.py`
(retrieval's top-N as lists), `training.py` (the training steps), `trained.py` (a trained ranker: requests,
evaluation, its folder in a bundle).
"""

from crossrec.config import RankerConfig  # the ranker's settings live with the other config
from crossrec.ranker.features import (
    FEATURES,
    ItemTable,
    ListBatch,
    build_item_table,
    list_features,
    table_rows_for,
    two_hop,
)
from crossrec.ranker.lists import RankLists, build_lists, candidate_lists
from crossrec.ranker.net import RankerNet
from crossrec.ranker.trained import RANKER_DIR, RankedScorer, Ranker, RankRequest, load_ranker, save_ranker
from crossrec.ranker.training import fit_standardizer, ranker_epoch, rerank_ndcg

__all__ = [
    "FEATURES",
    "RankRequest",
    "ItemTable",
    "ListBatch",
    "RankerNet",
    "Ranker",
    "RankLists",
    "build_item_table",
    "build_lists",
    "list_features",
    "ranker_epoch",
    "rerank_ndcg",
    "RankedScorer",
    "save_ranker",
    "load_ranker",
    "RANKER_DIR",
    "candidate_lists",
    "table_rows_for",
    "fit_standardizer",
    "two_hop",
    "RankerConfig",
]
