import sys

from vna.cli import main

sys.exit(main())
