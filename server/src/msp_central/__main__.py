import sys

from msp_central.cli import main

sys.exit(main())
