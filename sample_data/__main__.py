import sys

from sample_data.build import build_all

sys.exit(build_all(force="--force" in sys.argv))
