"""Moving a checkpoint image between nodes: the wire protocol, the sender, the receiver.

migrt.transfer.wire     framing and the shared-secret handshake (HMAC challenge-response)
migrt.transfer.sender   streams an image dir over parallel TCP connections, zstd and xxhash
                        per chunk, while CRIU is still writing it; full or delta (pre-copy)
migrt.transfer.receiver writes arriving chunks into a staging dir and checks every digest
"""
