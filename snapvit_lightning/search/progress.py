""":class:`SearchProgress`: what :class:`~.callback.EvolutionarySearch` reports per evaluation.

A progress bar of Lightning's own kind (:class:`~lightning.pytorch.callbacks.progress.tqdm_progress.Tqdm`,
placed like the validation bar under the training bar) with the fitness and the best so far,
and the metrics ``search/fitness``, ``search/best`` and one ``search/cos_mlp{m}_head{h}`` per
ratio pair for every logger of the Trainer, at ``step = evaluation index``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = [
    "SearchProgress",
    "cosine_metric_names",
]


def cosine_metric_names(ratio_pairs: Sequence[tuple[float, float]]) -> list[str]:
    """The logged name of each ratio pair's cosine, e.g. ``search/cos_mlp0.35_head0.2``."""
    return [f"search/cos_mlp{m:g}_head{h:g}" for m, h in ratio_pairs]


def _shown(fitness: float, digits: int) -> str:
    """``fitness`` for people: ``stopped`` for a candidate stopped early (``nan``)."""
    return "stopped" if math.isnan(fitness) else f"{fitness:.{digits}f}"


def _search_bar(trainer: pl.Trainer, total: int, initial: int) -> Tqdm | None:
    """A bar under the training bar, or ``None`` where the Trainer shows no progress bar.

    The Trainer disables its progress bar callback on non-zero ranks and when
    ``enable_progress_bar=False`` (then ``progress_bar_callback`` is ``None``).
    """
    bar_callback = trainer.progress_bar_callback
    if bar_callback is None or bar_callback.is_disabled or not trainer.is_global_zero:
        return None
    position = 2 * int(getattr(bar_callback, "process_position", 0)) + 1  # where the validation bar goes
    return Tqdm(
        desc="Search",
        total=total,
        initial=initial,
        position=position,
        leave=True,
        dynamic_ncols=True,
        file=sys.stdout,
        smoothing=0,
        bar_format=TQDMProgressBar.BAR_FORMAT,
    )


class SearchProgress:
    """Reports the evaluations of one search: progress bar, loggers, or plain lines.

    Args:
        trainer: The Trainer whose progress bar setting and ``loggers`` are used.
        total: Evaluations of the whole search (``max_evals``).
        done: Evaluations already made (a resumed search), where the bar starts.
        ratio_pairs: The fitness's ``(mlp_ratio, head_ratio)`` pairs, in order.
        log_every_n_evals: Without a progress bar, print a line every this many evaluations
            (``0``: never). With a bar it prints none.

    Raises:
        ValueError: If ``total < 1``, ``done`` is not in ``[0, total]`` or
            ``log_every_n_evals < 0``.
    """

    def __init__(
        self,
        trainer: pl.Trainer,
        total: int,
        done: int,
        ratio_pairs: Sequence[tuple[float, float]],
        log_every_n_evals: int,
    ) -> None:
        if total < 1:
            raise ValueError(f"total must be >= 1, got {total!r}")
        if not 0 <= done <= total:
            raise ValueError(f"done must be in [0, total={total}], got {done!r}")
        if log_every_n_evals < 0:
            raise ValueError(f"log_every_n_evals must be >= 0, got {log_every_n_evals!r}")
        self.trainer = trainer
        self.total = total
        self.names = cosine_metric_names(ratio_pairs)
        self.log_every_n_evals = log_every_n_evals
        self.bar = _search_bar(trainer, total, done) if done < total else None
        self._start = time.perf_counter()

    def update(self, idx: int, fitness: float, best: float, cosines: Sequence[float]) -> None:
        """Report evaluation ``idx`` (0-based over the whole search).

        A candidate the search stopped early has ``fitness`` ``nan``: the loggers get ``nan``, the
        bar and the console lines say ``stopped``.

        Raises:
            ValueError: If ``cosines`` does not hold one value per ratio pair.
        """
        if len(cosines) != len(self.names):
            raise ValueError(f"cosines must hold {len(self.names)} values (one per ratio pair), got {len(cosines)}")
        metrics = {"search/fitness": fitness, "search/best": best, **dict(zip(self.names, map(float, cosines)))}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=idx)
            logger.save()  # the curves are readable while the search runs
        if self.bar is not None:
            self.bar.set_postfix(fitness=_shown(fitness, 4), best=f"{best:.4f}", refresh=False)
            self.bar.update(1)
            return
        n = self.log_every_n_evals
        if n and ((idx + 1) % n == 0 or idx + 1 == self.total):
            rank_zero_info(
                f"EvolutionarySearch: eval {idx + 1}/{self.total} fitness {_shown(fitness, 6)} best {best:.6f} "
                f"({time.perf_counter() - self._start:.1f} s)"
            )

    def pulse(self) -> None:
        """Redraw the bar (its elapsed time) while a staged generation runs: its candidates are reported when it ends.

        On a terminal only: in a log file each redraw is another line.
        """
        if self.bar is not None and getattr(self.bar.fp, "isatty", lambda: False)():
            self.bar.refresh()

    def close(self) -> None:
        """Close the bar (it stays on screen)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
