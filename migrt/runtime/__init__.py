"""The runtime: create-or-restore, start, delete and checkpoint of one container, and what a
restore marker may name (checkpoint dirs, staged migrations, encrypted images)."""
