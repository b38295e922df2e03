"""python -m cxrjax.data.phantom --grid=OUT.png | --bench=N (see cli.py)."""

from .cli import main

main()
