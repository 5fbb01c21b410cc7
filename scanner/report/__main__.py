"""`python -m scanner.report --out DIR [--truth FILE]`: (re)write DIR/report.html."""

import sys

from scanner.report.html import main

sys.exit(main())
