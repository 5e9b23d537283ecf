"""`python -m daemon ...` is the `loraloom` command."""

import sys

from .cli import main

sys.exit(main())
