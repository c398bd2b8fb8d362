import sys

from p2preg.cli import main

sys.exit(main())
