"""`python -m bgmatte` is the same as the `bgmatte` command."""
import sys

from bgmatte.cli import main

sys.exit(main())
