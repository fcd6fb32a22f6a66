"""Known-answer checks: small, fully specified problems whose right answer is known, run
through the normal training and sampling machinery to show a mechanism works (or which link of
the chain breaks)."""
