"""The Streamlit results viewer: reads run directories (``runs.py``) and calls the serve endpoint (``app.py``).

Launch it with ``skinsynth view --runs runs/ --endpoint http://127.0.0.1:8000``.
"""

from __future__ import annotations

from pathlib import Path

APP_PATH = Path(__file__).with_name("app.py")

DEFAULT_PORT = 8501


def launch_command(runs_root: Path, endpoint: str, port: int = DEFAULT_PORT, python: str | None = None) -> list[str]:
    """The ``streamlit run`` command line of the viewer: headless, on loopback only (it has no authentication).

    Args:
        runs_root: folder of run directories (or one run directory).
        endpoint: base URL of the serve endpoint the "Try it" page posts to.
        port: the viewer's port.
        python: the interpreter (default: this one, so the viewer runs in skinsynth's environment).
    """
    import sys

    return [
        python or sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP_PATH),
        "--server.headless=true",
        "--server.address=127.0.0.1",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        "--",
        "--runs",
        str(runs_root),
        "--endpoint",
        endpoint,
    ]
