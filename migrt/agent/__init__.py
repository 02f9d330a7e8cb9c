"""The node agent (`migrt agent`): receives migrations over TCP and restores them here.

Peers authenticate with a shared secret (migrt.transfer.wire) before they can send
anything. A migration is staged (migrt.agent.staging), checked chunk by chunk as it
arrives, and then either restored by the agent itself (it runs `migrt create` on a
bundle carrying the restore marker) or left for a later `create` that names it.
"""
