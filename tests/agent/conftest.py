import sys
from pathlib import Path

# make the helper module importable without a package (tests/ has no __init__.py)
sys.path.insert(0, str(Path(__file__).parent))
