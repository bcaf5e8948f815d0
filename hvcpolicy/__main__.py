import sys

from hvcpolicy.cli.main import main

sys.exit(main())
