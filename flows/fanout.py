"""Ingestion fan-out through a Prefect task runner, chosen by ``orchestration.task_runner``.

The flow's ingest stage hands :func:`task_runner_decode_map` to ``tasks.stages.ingest.run_ingest``:
the files are cut into consecutive chunks and the Prefect task ``decode-files`` is mapped over
them (``decode_files.submit``, a bounded window of chunks at a time) on the flow run's task runner, which ``medtransfer run`` sets from
the configuration (:func:`flow_task_runner`), so every chunk is a task run in the Prefect UI. The decoding itself is ``tasks.data.file_decoding.decode_chunk``; only where it runs changes:

- ``threads`` (default): Prefect's ``ThreadPoolTaskRunner``. Reading, decompressing, windowing
  and resizing spend most of their time outside the GIL: on 2 cores threads decoded 1.2x
  (1000 512x512 files) to 2.3x (the demo set) faster than the stage's own process pool,
  which pays for pickling every image back (``benchmarks/results/fanout.md``);
- ``processes``: Prefect's ``ProcessPoolTaskRunner`` on this machine, for decoders that
  hold the GIL;
- ``dask``: ``prefect-dask``'s ``DaskTaskRunner``, on a local Dask cluster started for the
  run or on the scheduler at ``orchestration.dask_address`` (e.g. ``tcp://host:8786``).

The results come back in file order, so the dataset is byte-identical whichever runner
decoded it. With ``data.workers: 1`` (and no Dask scheduler address) there is nothing to fan
out: the files are decoded in the flow's own process, as ``medtransfer ingest`` does.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from tasks.config import DataParams, Params
from tasks.data.channels import keeps_colour
from tasks.data.file_decoding import (
    DecodeMap,
    FileOutcome,
    decode_chunk,
    decode_in_process_pool,
    split_in_chunks,
)
from tasks.errors import MedtransferError

# Chunks submitted ahead per worker: enough that none waits for the next, few enough that
# memory does not grow with the file count (:func:`in_window`).
CHUNKS_IN_FLIGHT_PER_WORKER = 4


@task(name="decode-files", cache_policy=NO_CACHE, persist_result=False)
def decode_files(
    folder: str, paths: list[str], image_size: int, multiframe: str, salt: str, colour: bool
) -> list[FileOutcome]:
    """Decode one chunk of files (paths under ``folder``); one outcome per file, in order."""
    return decode_chunk(
        Path(folder), [Path(p) for p in paths], image_size, multiframe, salt, colour
    )


@dataclass(frozen=True)
class FanoutConfig:
    """Where the flow decodes: ``orchestration.task_runner`` and ``dask_address``, with the
    ``data.workers`` width."""

    runner: str
    workers: int
    dask_address: str | None

    @classmethod
    def from_params(cls, params: Params) -> FanoutConfig:
        """The settings of ``orchestration`` (checked by :mod:`tasks.config`) and ``data``."""
        return cls(
            runner=params.orchestration.task_runner,
            workers=params.data.worker_count,
            dask_address=params.orchestration.dask_address,
        )

    @property
    def fans_out(self) -> bool:
        """False for one local worker: starting a pool (a process, a cluster) would only add
        its start-up to decoding in the flow's own process."""
        return self.workers > 1 or self.dask_address is not None

    def task_runner(self) -> TaskRunner:
        """The Prefect task runner these settings name, ``workers`` wide."""
        if self.runner == "processes":
            return ProcessPoolTaskRunner(max_workers=self.workers)
        if self.runner == "threads":
            return ThreadPoolTaskRunner(max_workers=self.workers)
        return _dask_runner(self.workers, self.dask_address)


def dask_runner_class() -> type[TaskRunner]:
    """prefect-dask's ``DaskTaskRunner``.

    Raises:
        MedtransferError: prefect-dask (the ``dask`` extra) is not installed.
    """
    # Imported here: dask's import costs about a second, paid only by those who use it.
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:
        raise MedtransferError(
            "orchestration.task_runner=dask needs the dask extra: pip install "
            "'medtransfer[dask]' (or set orchestration.task_runner to threads or processes)."
        ) from err
    return DaskTaskRunner


def _dask_runner(workers: int, address: str | None) -> TaskRunner:
    """prefect-dask's runner: on the scheduler at ``address``, or on a local cluster of
    ``workers`` single-threaded processes (decoding holds the GIL)."""
    DaskTaskRunner = dask_runner_class()
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


@contextmanager
def warnings_silenced() -> Iterator[None]:
    """No warnings shown in this process meanwhile (pydicom's, from the decoding threads)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def api_shared_with_workers() -> Iterator[None]:
    """Point worker processes at the Prefect API this flow run reports to.

    With no ``PREFECT_API_URL`` (``medtransfer run`` on a laptop), Prefect serves the flow
    from a temporary local server that only this process knows; a worker process (of the
    process pool or a local Dask cluster) would start a temporary server of its own, seconds
    each. Within this context the settings the runners hand their workers name that server.
    """
    if PREFECT_API_URL.value():
        yield
        return
    # The flow run's client talks to that server (Prefect starts it with the run): its public
    # address is what the workers need.
    with get_client(sync_client=True) as client:
        api_url = str(client.api_url).rstrip("/")
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        yield


def flow_task_runner(params: Params) -> TaskRunner:
    """The task runner a flow that ingests with ``params`` runs with: the configured one when
    decoding fans out, else Prefect's default (nothing is mapped on it)."""
    fanout = FanoutConfig.from_params(params)
    return fanout.task_runner() if fanout.fans_out else ThreadPoolTaskRunner()


def task_runner_decode_map(params: Params) -> DecodeMap:
    """A :data:`~tasks.data.file_decoding.DecodeMap` that maps ``decode-files`` over the chunks with
    ``.map`` on the task runner of the flow run it is called in (:func:`flow_task_runner`, set
    with ``flow.with_options(task_runner=...)`` by ``medtransfer run``, the watch flow and the
    deployments). A flow started otherwise (its decorator's thread pool) decodes on its own
    runner, with a warning naming the configured one.

    A flow-level runner lives as long as the flow run: a local Dask cluster started for the run
    stays up (idle) until the run ends, not only while ingest decodes.
    """
    fanout = FanoutConfig.from_params(params)
    if fanout.runner == "dask":
        dask_runner_class()  # a missing extra is said before any file is read
    if not fanout.fans_out:
        return decode_in_process_pool

    def decode_map(
        folder: Path, files: list[Path], data: DataParams, salt: str
    ) -> Iterator[FileOutcome]:
        _warn_if_other_runner(fanout)
        # Decoding threads must not each swap the process-wide warning filters (that is not
        # thread-safe): silence warnings here, once, for all of them. Worker processes
        # silence their own, and need the flow's API address instead.
        shared = warnings_silenced() if fanout.runner == "threads" else api_shared_with_workers()
        chunks = split_in_chunks(files, data.worker_count)

        def submit(chunk: list[Path]) -> PrefectFuture:
            return decode_files.submit(
                str(folder),
                [str(path) for path in chunk],
                data.image_size,
                data.multiframe,
                salt,
                keeps_colour(data),
            )

        with shared:
            yield from in_window(submit, chunks, CHUNKS_IN_FLIGHT_PER_WORKER * data.worker_count)

    return decode_map


def in_window(
    submit: Callable[[list[Path]], PrefectFuture], chunks: list[list[Path]], window: int
) -> Iterator[FileOutcome]:
    """Each chunk's outcomes, in order, with at most ``window`` chunks submitted and not yet
    consumed: memory stays bounded by the window, whatever the file count (mapping every
    chunk at once kept every decoded chunk until the end: 100,000 files, 100,000 images)."""
    pending: deque[PrefectFuture] = deque()
    upcoming = iter(chunks)
    for chunk in islice(upcoming, window):
        pending.append(submit(chunk))
    while pending:
        outcomes = pending.popleft().result()  # the future is dropped: its result goes with it
        following = next(upcoming, None)
        if following is not None:
            pending.append(submit(following))
        yield from outcomes


def _warn_if_other_runner(fanout: FanoutConfig) -> None:
    """Say so when the flow run's task runner is not the kind ``orchestration.task_runner``
    names (a flow started without :func:`flow_task_runner`)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    runner = getattr(context, "task_runner", None)
    wanted = {"threads": ThreadPoolTaskRunner, "processes": ProcessPoolTaskRunner}.get(
        fanout.runner
    ) or dask_runner_class()
    if runner is not None and not isinstance(runner, wanted):
        get_run_logger().warning(
            "orchestration.task_runner is %s but this flow run's task runner is %s: decoding "
            "there. Start the flow with flow.with_options(task_runner=flow_task_runner(params)) "
            "(as `medtransfer run` does) to use the configured one.",
            fanout.runner,
            type(runner).__name__,
        )
