import sys

from mobillama.cli import main

sys.exit(main())
