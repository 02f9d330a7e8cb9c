"""A migration from start to end: precheck, freeze, dump, send, restore on the peer, release
or roll back, and the recovery that finishes a migration whose caller died."""
