import sys

from cogpipe.world.cli import main

sys.exit(main())
