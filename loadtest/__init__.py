"""Load and benchmark tools for walletd; run from the repository root as `python -m loadtest.X`.

Not part of the installed `walletd` package (docs/ARCHITECTURE.md, "Packaging"): these tools
drive a running server over HTTP and never import the server's code.
"""
