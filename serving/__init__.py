"""Ray Serve graph of crossrec: the FastAPI ingress `Recommender` (validation, retrieval, the ranker and reasons in
one replica: crossrec.recommender over crossrec.retrieval) and the `Encoder` it calls for text entries.

`serving.app` has the typed app builder (`build_app`) and `deploy`; `serving.deployments` the deployments;
`serving.schemas` the HTTP contract. Importing this package does not import Ray.
"""

__all__ = ["app", "deployments", "schemas"]
