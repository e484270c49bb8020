"""The inference log: one JSON line per prediction, written off the request path.

Requests put records on a bounded queue and return; a background thread of lower CPU priority
appends them to ``<dir>/<UTC date>.jsonl`` in batches, at most every ``FLUSH_SECONDS`` (woken
and appending once per request, it took the GIL from the requests 200 times a second at 200
req/s). When the queue is full (the disk cannot keep up) a record is dropped and counted rather
than slowing requests down; ``dropped`` says how many. A write that fails (disk full, directory
gone) is logged and its records counted as dropped; the writer carries on with the next batch.

A record (``PredictionService.predict`` and the shadow write them): ts, request_id, flight_id,
model_name, model_version, stage (champion, canary or shadow), feature_hash, delay_probability,
latency_ms, batch_size; and, when the request was traced (``tracing``), trace_id (the W3C trace
id, 32 hex digits) and span_id (16 hex digits: the scoring span that gave this probability).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import queue
import threading
from pathlib import Path

log = logging.getLogger("mlplatform.serving")
FLUSH_SECONDS = 0.5  # a record is written at most this long after its request


class InferenceLog:
    def __init__(self, directory: Path, max_pending: int = 100_000):
        self.directory = Path(directory)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        self.written = 0
        self.error: str | None = None
        self._stopping = threading.Event()

    def _drop(self, n: int = 1) -> None:
        with self._lock:
            self.dropped += n

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="inference-log", daemon=True)
        self._thread.start()

    def append(self, record: dict) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop()

    def stop(self) -> None:
        """Write what is pending, then stop."""
        if self._thread is not None:
            self._stopping.set()
            try:
                self._queue.put(None, timeout=5)
            except queue.Full:  # the writer is not keeping up: do not hang the shutdown
                pass
            self._thread.join(timeout=30)
            self._thread = None

    def path_for(self, day: dt.date) -> Path:
        return self.directory / f"{day.isoformat()}.jsonl"

    def _run(self) -> None:
        from mlplatform.serving.live import in_background

        in_background()
        while True:
            batch = [self._queue.get()]
            self._stopping.wait(FLUSH_SECONDS)  # what comes meanwhile joins the batch
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            records = [r for r in batch if isinstance(r, dict)]
            if records:
                by_day: dict[Path, list[str]] = {}
                for record in records:
                    path = self.path_for(dt.date.fromisoformat(record["ts"][:10]))
                    by_day.setdefault(path, []).append(json.dumps(record, default=str))
                for path, lines in by_day.items():
                    try:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        with path.open("a", encoding="utf-8") as fh:
                            fh.write("\n".join(lines) + "\n")
                        self.written += len(lines)
                        self.error = None
                    except OSError as exc:
                        self.error = f"could not write {path}: {exc}"
                        log.error("inference log: %s; %d records lost", self.error, len(lines))
                        self._drop(len(lines))
            if any(r is None for r in batch):
                return

