import sys

from .cli import main

# The guard matters: tokenize's worker processes are spawned, and spawning imports the main module again.
if __name__ == "__main__":
    sys.exit(main())
