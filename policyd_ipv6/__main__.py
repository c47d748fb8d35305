"""``python3 -m policyd_ipv6``: the same entry point as the ``policyd-ipv6`` command."""

import sys

from policyd_ipv6.daemon.cli import main

sys.exit(main())
