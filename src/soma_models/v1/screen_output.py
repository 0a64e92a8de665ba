"""Screening's output file: JSON lines, resuming, and one share per process (framework-free).

`soma-models screen --out OUT` writes one JSON line per sample, each carrying the
screening's run id. A single process appends to OUT. Under a launcher (torchrun sets
RANK, WORLD_SIZE and LOCAL_RANK; several nodes through its rendezvous, on a file system
they share), every rank screens a disjoint share of the samples and appends to its own
part file, `OUT.rank{R}`; once every rank is done, rank 0 merges OUT and the parts into
OUT (atomically, every sample once, in input order) and removes the parts.

Resuming reads OUT and every part there is, whatever number of ranks wrote them, so a run
resumes after an interruption and after a change of the number of ranks; the samples not
yet done are shared out again among the ranks of the new run.

The ranks meet twice (`Coordinator`): after reading what is done (no rank appends before
every rank has read, so all agree on what is left) and at the end (the summaries, then the
merge). `join_ranks` is the torch.distributed one (gloo: only small objects travel, so it
works whatever device the models run on).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, Self

from soma_models.atomic import atomic_write
from soma_models.v1.prescreen import Margins
from soma_models.v1.screening import Screener, read_sample

PART_SUFFIX = ".rank"


@dataclass(frozen=True)
class Share:
    """Which share of the samples this process screens: every `world_size`-th sample left
    to do, from the `rank`-th on. local_rank: the process's index on its node (its GPU)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ: Any = None) -> Share:
        """The launcher's RANK, WORLD_SIZE and LOCAL_RANK (absent: one process), as the
        trainer reads them (`soma_models.train.distributed`); nonsense is a ValueError."""
        env = os.environ if environ is None else environ
        values = {}
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            text = env.get(name, default)
            try:
                values[name] = int(text)
            except ValueError:
                raise ValueError(f"environment variable {name}={text!r} is not an integer "
                                 "(it is set by the launcher, e.g. torchrun)") from None
        share = cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])
        if share.world_size < 1 or not 0 <= share.rank < share.world_size \
                or share.local_rank < 0:
            raise ValueError(f"RANK={share.rank}, WORLD_SIZE={share.world_size}, LOCAL_RANK="
                             f"{share.local_rank}: need 0 <= RANK < WORLD_SIZE")
        return share

    def take(self, todo: Sequence[str]) -> list[str]:
        """This rank's samples of `todo` (disjoint across ranks, together all of it)."""
        return list(todo[self.rank::self.world_size])

    def device(self, device: object) -> object:
        """The rank's device: a bare "cuda" becomes "cuda:LOCAL_RANK" (one GPU per rank)."""
        if self.world_size > 1 and isinstance(device, str) and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


class Coordinator(Protocol):
    """How the ranks of one screening meet."""

    def barrier(self) -> None: ...

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        ...


class Alone:
    """The `Coordinator` of a single process."""

    def barrier(self) -> None:
        pass

    def gather(self, value: Any) -> list[Any]:
        return [value]


class TorchRanks:
    """A `Coordinator` over torch.distributed: the launcher's process group (joined with
    gloo from its environment unless the caller already joined one)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo")

    def barrier(self) -> None:
        self._dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self._dist.get_world_size()
        self._dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if self.owned and self._dist.is_initialized():
            self._dist.destroy_process_group()


def join_ranks(share: Share) -> Coordinator:
    """The coordinator for `share`: `Alone` for one process, else `TorchRanks`."""
    return Alone() if share.world_size == 1 else TorchRanks()


# --------------------------------------------------------------------------- files

def part_path(out: str | os.PathLike, rank: int) -> Path:
    """Rank `rank`'s part file beside `out`."""
    out = Path(out)
    return out.with_name(f"{out.name}{PART_SUFFIX}{rank}")


def existing_parts(out: str | os.PathLike) -> list[Path]:
    """The part files beside `out`, whatever number of ranks wrote them, by rank."""
    out = Path(out)
    found = []
    prefix = out.name + PART_SUFFIX
    folder = out.parent
    if folder.is_dir():
        for entry in folder.iterdir():
            rank = entry.name[len(prefix):]
            if entry.name.startswith(prefix) and rank.isdigit():
                found.append((int(rank), entry))
    return [path for _, path in sorted(found)]


def scan_lines(path: Path, run: str | None = None) -> Iterator[tuple[str, int]]:
    """(sample, byte offset of its line) for every whole line of a screening output file
    (a trailing partial line, left by an interrupted write, is not one). A line that is not
    a screening result is a ValueError naming it; so, with `run`, is one written by
    another screening."""
    with open(path, "rb") as fh:
        offset = 0
        for number, line in enumerate(fh, 1):
            start, offset = offset, offset + len(line)
            if not line.endswith(b"\n"):
                return
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                sample = record["sample"]
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
                raise ValueError(f"{path}:{number}: not a screening result line; refusing "
                                 "to append to it (use another --out)") from None
            if run is not None and record.get("run") != run:
                raise ValueError(f"{path}:{number}: written by another screening (other "
                                 "models, targets, seed or revision); refusing to mix "
                                 "results (use another --out)")
            yield sample, start


def check_output(path: Path) -> None:
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: --out is not a regular file")


def done_in_parts(out: str | os.PathLike, run: str | None = None) -> set[str]:
    """Samples already written to `out` or to any of its part files (read only: other
    ranks may be appending to theirs)."""
    done: set[str] = set()
    for path in [Path(out), *existing_parts(out)]:
        check_output(path)
        if path.exists():
            done.update(sample for sample, _ in scan_lines(path, run))
    return done


def merge_parts(out: str | os.PathLike, samples: Sequence[str], run: str | None = None) -> int:
    """Rewrite `out` with its lines and those of every part file, each sample once (the
    first line found, `out` first), in the order of `samples` (lines of samples not in it
    keep their place after them), atomically; then remove the parts. Returns how many
    lines `out` holds. Memory: one file offset per sample, never the lines themselves."""
    out = Path(out)
    parts = existing_parts(out)
    sources = [p for p in [out, *parts] if p.exists()]
    where: dict[str, tuple[int, int]] = {}
    for index, path in enumerate(sources):
        for sample, offset in scan_lines(path, run):
            where.setdefault(sample, (index, offset))
    listed = set(samples)
    order = list(dict.fromkeys([s for s in samples if s in where] +
                               [s for s in where if s not in listed]))

    def lines() -> Iterator[bytes]:
        handles = [open(p, "rb") for p in sources]
        try:
            for sample in order:
                index, offset = where[sample]
                handles[index].seek(offset)
                yield handles[index].readline()
        finally:
            for fh in handles:
                fh.close()

    atomic_write(out, lines())
    for path in parts:
        path.unlink()
    return len(order)


# --------------------------------------------------------------------------- writing


def finished_samples(out: str | os.PathLike, run: str | None = None) -> set[str]:
    """Samples already written to `out` (for resuming). A trailing partial line, left by
    an interrupted write, is cut off so that appending starts on a fresh line. With `run`
    (`Screener.run_id`), a line written by another screening is refused, before anything
    is cut."""
    path = Path(out)
    check_output(path)
    if not path.exists():
        return set()
    done = {sample for sample, _ in scan_lines(path, run)}
    with open(path, "rb+") as fh:
        size = end = fh.seek(0, os.SEEK_END)
        while end > 0:                  # back to the last newline
            step = min(end, 1 << 16)
            fh.seek(end - step)
            newline = fh.read(step).rfind(b"\n")
            if newline >= 0:
                end = end - step + newline + 1
                break
            end -= step
        if end < size:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return done


class LineWriter:
    """Appends whole lines durably: each line goes out in one write and is fsynced, so an
    interruption loses at most the line being written, and `finished_samples` cuts that."""

    def __init__(self, out: str | os.PathLike | None):
        self.path = None if out is None else Path(out)
        self._fd = None if self.path is None else os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        if self._fd is None:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            return
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Summary:
    """One screening run (all ranks together): samples screened and already done, hits
    (None without a threshold), seconds, and with a prescreen the samples it dropped as
    proven misses and its margins (over several ranks, the widest of each)."""

    screened: int
    skipped: int
    hits: int | None
    seconds: float
    dropped: int | None = None
    margins: Margins | None = None
    ranks: int = 1

    def __str__(self) -> str:
        rate = self.screened / self.seconds if self.seconds > 0 else float("inf")
        hits = "no --threshold" if self.hits is None else f"{self.hits} hits"
        skipped = f" ({self.skipped} already done)" if self.skipped else ""
        ranks = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        text = (f"screened {self.screened} samples{skipped}{ranks}, {hits}, "
                f"{rate:.3g} samples/s")
        if self.dropped is not None:
            text += (f"; prescreen bf16 dropped {self.dropped} as proven misses, re-scored "
                     f"{self.screened - self.dropped} exactly")
            if self.margins is not None:
                text += f"; {self.margins}"
        return text

    @classmethod
    def of_ranks(cls, summaries: Sequence[Summary], skipped: int) -> Summary:
        """The ranks' summaries as one (they ran at the same time: the slowest's time)."""
        first = summaries[0]
        margins = [s.margins for s in summaries if s.margins is not None]
        widest = None
        if margins:
            def most(values: list[float | None]) -> float | None:
                known = [v for v in values if v is not None]
                return max(known) if known else None

            widest = Margins(max(m.loss for m in margins), max(m.distance for m in margins),
                             most([m.loss_deviation for m in margins]),
                             most([m.distance_deviation for m in margins]),
                             sum(m.samples for m in margins))
        return cls(sum(s.screened for s in summaries), skipped,
                   None if first.hits is None else sum(s.hits or 0 for s in summaries),
                   max(s.seconds for s in summaries),
                   None if first.dropped is None else sum(s.dropped or 0 for s in summaries),
                   widest, len(summaries))


def screen_to_jsonl(screener: Screener, sample_paths: Sequence[str],
                    out: str | os.PathLike | None = None, *, embeddings: bool = False,
                    progress: bool = False, stream: IO[str] | None = None,
                    share: Share | None = None, coordinator: Coordinator | None = None
                    ) -> Summary:
    """Screen sample files, one JSON line each to `out` (or stdout) with the screening's
    `run` id, skipping the samples `out` already holds (and refusing an `out` written by
    another screening); returns the run's summary (all ranks').

    share, coordinator: this process's share under a launcher and how the ranks meet
    (`soma_models.v1.screen_shares`; default: one process). Ranks append to their own
    part files beside `out` and rank 0 merges them into `out` at the end, in the order
    of `sample_paths`; part files left by an earlier run (any number of ranks) count as
    done and are merged too.
    """
    share = share or Share()
    coordinator = coordinator or Alone()
    run = screener.run_id()
    if out is None and share.world_size > 1:
        raise ValueError(f"screening on {share.world_size} ranks needs --out (each rank "
                         "writes its part beside it)")
    in_parts = out is not None and (share.world_size > 1 or bool(existing_parts(out)))
    if in_parts:
        done = done_in_parts(out, run)  # type: ignore[arg-type]
        coordinator.barrier()           # every rank has read before any appends
        writing: str | os.PathLike | None = part_path(out, share.rank)  # type: ignore[arg-type]
        finished_samples(writing, run)  # type: ignore[arg-type]
    else:
        done = finished_samples(out, run) if out is not None else set()
        writing = out
    todo = [p for p in sample_paths if p not in done]
    mine = share.take(todo)
    hits = dropped = 0
    start = time.perf_counter()
    from tqdm.auto import tqdm

    with LineWriter(writing) as writer, tqdm(total=len(mine),
                                             disable=not progress or share.rank != 0,
                                             file=stream or sys.stderr, unit="sample",
                                             desc="screening", dynamic_ncols=True) as bar:
        for result in screener.screen((p, read_sample(p)) for p in mine):
            writer.write(json.dumps({**result.to_json(embeddings), "run": run},
                                    allow_nan=False))
            hits += bool(result.hit)
            dropped += not result.exact
            bar.update(1)
    mine_summary = Summary(len(mine), 0, None if screener.threshold is None else hits,
                           time.perf_counter() - start,
                           None if screener.prescreen is None else dropped, screener.margins)
    summaries = coordinator.gather(mine_summary)
    if in_parts:
        if share.rank == 0:
            merge_parts(out, sample_paths, run)  # type: ignore[arg-type]
        coordinator.barrier()           # the merged file is there when any rank returns
    return Summary.of_ranks(summaries, len(sample_paths) - len(todo))


__all__ = ["Alone", "Coordinator", "LineWriter", "Share", "Summary", "TorchRanks",
           "done_in_parts", "existing_parts", "finished_samples", "join_ranks", "merge_parts",
           "part_path", "scan_lines", "screen_to_jsonl"]
