"""Command-line tools (`python -m cxrjax.tools.<name>`): weight import and other one-off utilities."""
