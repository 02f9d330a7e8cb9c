"""What migrt asks of CRIU beyond runc's flags: its config file, the network lock, the lazy
page server's TLS and pipe limits, and the failure points the tests arm."""
