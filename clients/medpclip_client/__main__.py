"""`python -m medpclip_client`: the `medpclip-client` command line."""

from .cli import main

raise SystemExit(main())
