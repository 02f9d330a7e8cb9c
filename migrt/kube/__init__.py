"""migrt on Kubernetes: the PodMigration controller and `kubectl migrt`.

Talks to the API server through a small client of its own (client.py) and to nodes only
through their migrt agents (agents.py). Nothing here is on the runtime's path."""
