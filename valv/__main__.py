import sys

from valv.cli import main

sys.exit(main())
