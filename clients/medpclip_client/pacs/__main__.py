"""`python -m medpclip_client.pacs`: the `medpclip-pacs` command line."""

import sys

from .cli import main

sys.exit(main())
