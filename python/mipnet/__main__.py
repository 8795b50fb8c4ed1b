"""``python -m mipnet`` = the ``mipnet`` command (:mod:`mipnet.cli`)."""

import sys

from .cli import main

sys.exit(main())
