"""Ray Serve graph of crossrec: Encoder -> Retriever -> Ranker behind the FastAPI ingress `Recommender`.

`serving.app` has the typed app builder (`build_app`) and `deploy`; `serving.deployments` the deployments;
`serving.schemas` the HTTP contract. Importing this package does not import Ray.
"""

__all__ = ["app", "deployments", "schemas"]
