"""Rich consoles: diagnostics and progress go to stderr, results to stdout."""

from rich.console import Console

stderr_console = Console(stderr=True)
stdout_console = Console()
