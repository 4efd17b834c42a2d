import sys

from keyhole_sidecar.cli import main

sys.exit(main())
