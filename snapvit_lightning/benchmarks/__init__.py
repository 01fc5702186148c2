"""The measuring scripts, out of the core: each runs as ``python -m snapvit_lightning.benchmarks.<name>``.

* :mod:`.bench`: ``snapvit bench``: k-NN, fidelity, FLOPs/params and latency of an elastic checkpoint.
* :mod:`.job`: stage times of the whole main job at its defaults and the paper's settings (vs the official code).
* :mod:`.balance`: the search's balance / fitness settings against fidelity.
* :mod:`.scores`: scoring criteria against fidelity.
* :mod:`.search`: the fitness and the search loop's speed.
* :mod:`.slice`: slicing speed.
* :mod:`.step`: the scoring training step's speed.
* :mod:`.heldout`: the whole pipeline calibrated on one half of a folder, measured on the other.
* :mod:`.damping`: the corrected path's held-out fidelity per correction damping.
* :mod:`.first_gains`: what the search's first generations gain over its start.
* :mod:`.paper_vitb`: the paper's ViT-B/16 run as one whole `snapvit fit`, timed (for a GPU).

Nothing in the core imports from here.
"""

from __future__ import annotations

from typing import Callable, NoReturn


def run_as_script(main: Callable[[], int | None], module: str) -> NoReturn:
    """``python -m snapvit_lightning.benchmarks.<name>``: run ``main``; a user error is one line, status 2.

    As in ``snapvit``: a missing folder or a bad option prints ``python -m ...: error: <message>``, not
    a traceback (``SNAPVIT_TRACEBACK=1`` shows it), and this package's warnings print as
    ``python -m ...: warning: <message>``. ``main`` itself still raises, for Python callers.
    """
    from ..errors import exit_on_user_error, own_warnings_as

    prog = f"python -m {module}"
    with exit_on_user_error(prog), own_warnings_as(prog):
        code = main()
    raise SystemExit(code or 0)
