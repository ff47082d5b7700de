"""`lmpack fleet`: one model served by several physical servers through Ray Serve (docs/scale-out.md).

Ray does the clustering, the object transfer and the balancing; lmpack adds safe defaults for starting
nodes (node.py, token.py), the verified install of a bundle on every node (push.py), the Serve replica that
runs lmpack's own engine behind lmpack serve's API (replica.py), and the deployments with their rollback
(deploy.py). Ray is imported only here, and only when a fleet command runs: it is the `fleet` extra.
"""
