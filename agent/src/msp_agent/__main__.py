import sys

from msp_agent.cli import main

sys.exit(main())
