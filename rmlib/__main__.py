import sys

from rmlib.cli import main

sys.exit(main())
