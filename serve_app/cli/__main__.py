"""`python -m serve_app.cli`: the `modelserve` command without the console script."""

import sys

from serve_app.cli import main

sys.exit(main())
