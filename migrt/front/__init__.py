"""The front door: every runc call of the node enters here (front.sh, then fast.py), and
everything that is none of migrt's business leaves for runc at once. Nothing heavy is imported
in this package."""
