import sys

from migrt.kube.cli import main

sys.exit(main())
