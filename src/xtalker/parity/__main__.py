import sys

from xtalker.parity.checker import main

sys.exit(main())
