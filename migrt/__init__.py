"""migrt: a container live-migration runtime that sits in front of runc.

Kept empty on purpose: every runc call goes through `migrt.front.fast`, and importing this
package must cost nothing.
"""
__version__ = "0.1.0"
