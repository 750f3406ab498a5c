"""The entry point every bench script shares: bad input ends in one line, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

from leanlm.errors import LeanLMError


def run_script(main: Callable[[], int | None]) -> None:
    """Run `main` and exit with its status. A `LeanLMError` (a bad model name, a stale work folder, ...)
    prints as ``bench/<script>: error: ...``; a child process that failed has already printed why, so
    only its command and status are added."""
    name = f"bench/{Path(sys.argv[0]).name}"
    try:
        status = main()
    except LeanLMError as e:
        sys.exit(f"{name}: error: {e}")
    except subprocess.CalledProcessError as e:
        words = [e.cmd] if isinstance(e.cmd, str) else [str(c) for c in e.cmd]
        cmd = " ".join(words[:5]) + (" ..." if len(words) > 5 else "")
        sys.exit(f"{name}: error: a step failed with status {e.returncode} (its message is above): {cmd}")
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
