import sys

from lungsynth.cli import main

sys.exit(main())
