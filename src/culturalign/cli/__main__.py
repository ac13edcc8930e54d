"""`python -m culturalign.cli`, as `culturalign` (the old cli.py ran this way too)."""

from culturalign.cli import main

main()
