"""``python -m gossip_sgp.wan check|run|cleanup``: see :mod:`gossip_sgp.wan.cli`."""

import sys

from gossip_sgp.wan.cli import main

sys.exit(main())
