"""TensorBoard scalars (rank 0 only) and the per-rank text log.

`make_tensorboard_logger` is the `_target_` the official configs name under
`trainer.logging.tensorboard_writer`.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import uuid
from collections.abc import Mapping
from typing import Any, Union

from hydra.utils import instantiate
from numpy import ndarray
from torch import Tensor

from training.utils.train_utils import get_machine_local_and_dist_rank, makedir

Scalar = Union[Tensor, ndarray, int, float]

LOG_FORMAT = "%(levelname)s %(asctime)s %(filename)s:%(lineno)d: %(message)s"


class TensorBoardLogger:
    """Scalars to a SummaryWriter in `path`; a no-op on every rank but 0."""

    def __init__(self, path: str, *args: Any, filename_suffix: str | None = None, **writer_kwargs: Any) -> None:
        self._path = path
        self._writer = None
        _, rank = get_machine_local_and_dist_rank()
        if rank == 0:
            # Imported here so ranks that never write do not pay for TensorBoard's import.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(
                path, *args, filename_suffix=filename_suffix or str(uuid.uuid4()), **writer_kwargs
            )
        atexit.register(self.close)

    @property
    def path(self) -> str:
        return self._path

    @property
    def writer(self) -> Any:
        return self._writer

    def log(self, name: str, data: Scalar, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(name, data, global_step=step, new_style=True)

    def log_dict(self, payload: Mapping[str, Scalar], step: int) -> None:
        for name, value in payload.items():
            self.log(name, value, step)

    def log_hparams(self, hparams: Mapping[str, Scalar], meters: Mapping[str, Scalar]) -> None:
        if self._writer is not None:
            self._writer.add_hparams(dict(hparams), dict(meters))

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def make_tensorboard_logger(log_dir: str, **writer_kwargs: Any) -> TensorBoardLogger:
    makedir(log_dir)
    return TensorBoardLogger(log_dir, **writer_kwargs)


class Logger:
    """Fans scalars out to the configured writers (TensorBoard; `should_log: false` turns it off)."""

    def __init__(self, logging_conf: Any) -> None:
        tb_config = getattr(logging_conf, "tensorboard_writer", None)
        self.tb_logger = None
        if tb_config:
            tb_config = dict(tb_config)
            if tb_config.pop("should_log", True):
                self.tb_logger = instantiate(tb_config)

    def log(self, name: str, data: Scalar, step: int) -> None:
        if self.tb_logger is not None:
            self.tb_logger.log(name, data, step)

    def log_dict(self, payload: Mapping[str, Scalar], step: int) -> None:
        if self.tb_logger is not None:
            self.tb_logger.log_dict(payload, step)

    def log_hparams(self, hparams: Mapping[str, Scalar], meters: Mapping[str, Scalar]) -> None:
        if self.tb_logger is not None:
            self.tb_logger.log_hparams(hparams, meters)

    def close(self) -> None:
        if self.tb_logger is not None:
            self.tb_logger.close()


def setup_logging(
    name: str,
    output_dir: str | None = None,
    rank: int = 0,
    log_level_primary: str = "INFO",
    log_level_secondary: str = "ERROR",
) -> logging.Logger:
    """Console on every rank (quiet on ranks > 0) and a text file per rank in `output_dir`.

    Rank 0 writes `log.txt`, rank r > 0 `log_rank<r>.txt`, so a failure on any rank leaves a trace.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(log_level_primary)
    formatter = logging.Formatter(LOG_FORMAT)

    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.setLevel(log_level_primary if rank == 0 else log_level_secondary)
    root.addHandler(console)

    if output_dir:
        makedir(output_dir)
        filename = "log.txt" if rank == 0 else f"log_rank{rank}.txt"
        file_handler = logging.FileHandler(os.path.join(output_dir, filename), mode="a")
        file_handler.setFormatter(formatter)
        file_handler.setLevel(log_level_primary)
        root.addHandler(file_handler)
    return logging.getLogger(name)


def shutdown_logging() -> None:
    for handler in list(logging.getLogger().handlers):
        handler.flush()
        handler.close()
