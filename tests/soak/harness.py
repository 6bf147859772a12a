"""The soak's harness (tests/soak/soak.py runs it, from a snapshot of the code): the server
process and its samples, the worker processes and the killer of client processes, the final
checks, soak.csv and the summary with the goals (docs/SOAK.md).
"""

import argparse
import csv
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

import load
from load import KINDS, CALL_TIMEOUT_S, Limits, LoadConfig, ModelSpec, Tally

MIB = 1 << 20
LIMITS = Limits(max_message_bytes=8 * MIB, max_response_bytes=64 * MIB,
                max_open_streams=16)
GROWTH_FIRST = (5, 6, 7)  # the minutes whose samples are the growth baseline
GROWTH_LAST = 3  # the number of last samples compared with it
GROWTH_MIN_MINUTES = 10
RSS_GROWTH_GOAL = 0.02
SHUTDOWN_GRACE_S = 10
GOLDEN_CASES = 24
SAMPLE_EVERY_S = 5.0  # the server is sampled this often; each minute's row has the floor


# -- The server --------------------------------------------------------------------------------


@dataclass
class Sample:
    """The server process at one moment."""

    rss_kib: int
    hwm_kib: int
    fds: int
    threads: int
    cpu_s: float


def read_sample(pid: int) -> Sample:
    """VmRSS, VmHWM and Threads from /proc/PID/status, open descriptors (/proc/PID/fd) and
    user + system CPU seconds (/proc/PID/stat)."""
    status: Dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        status[key] = value.strip()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    ticks = os.sysconf("SC_CLK_TCK")
    return Sample(rss_kib=int(status["VmRSS"].split()[0]), hwm_kib=int(status["VmHWM"].split()[0]),
                  fds=len(os.listdir(f"/proc/{pid}/fd")), threads=int(status["Threads"]),
                  cpu_s=(int(fields[11]) + int(fields[12])) / ticks)


def copy_server(binary: Path, folder: Path) -> Path:
    """A copy of the binary (and its runfiles) in `folder`, so that a rebuild cannot swap it
    during the run. LibTorch is found through the binary's absolute rpath."""
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / binary.name
    shutil.copy2(binary, copy)
    runfiles = binary.parent / (binary.name + ".runfiles")
    if runfiles.is_dir():
        shutil.copytree(runfiles, folder / runfiles.name, symlinks=False, dirs_exist_ok=True)
    return copy


class Server:
    """The lmhead_server process, on 127.0.0.1 with --port 0, its log in `log_path`."""

    def __init__(self, binary: Path, args: List[str], folder: Path, ready_timeout_s: float = 180):
        port_file = folder / "port"
        port_file.unlink(missing_ok=True)
        self.log_path = folder / "server.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "--host", "127.0.0.1", "--port", "0", "--port_file", str(port_file),
                 *args], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None:
                raise RuntimeError(f"lmhead_server exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"lmhead_server not serving after {ready_timeout_s} s")
            time.sleep(0.05)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float) -> Optional[int]:
        """SIGTERM, then the exit status (None: it did not exit in time and was killed)."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None


def server_args(models: List[str], extra: List[str]) -> List[str]:
    return [f"--max_message_bytes={LIMITS.max_message_bytes}",
            f"--max_response_bytes={LIMITS.max_response_bytes}",
            f"--max_open_streams={LIMITS.max_open_streams}",
            f"--shutdown_grace_seconds={SHUTDOWN_GRACE_S}",
            *[f"--model={m}" for m in models], *extra]


def discover_models(address: str) -> List[ModelSpec]:
    with load.RemoteLMHead(address, timeout=CALL_TIMEOUT_S) as head:
        return [ModelSpec.from_info(info) for info in head.list_models()]


# -- Killed clients ----------------------------------------------------------------------------


class Killer(threading.Thread):
    """Every `interval_s`, starts a victim client process (load.victim_main), waits for its
    first answer, lets it run on for up to 0.5 s and kills it with SIGKILL, mid-call. Each is
    one 'killed_client' call: a problem when the victim never got an answer or had already
    exited. Stops at `end` (time.monotonic())."""

    def __init__(self, context: Any, config: LoadConfig, interval_s: float, end: float):
        super().__init__(name="killer", daemon=True)
        self.context, self.config, self.interval_s, self.end = context, config, interval_s, end
        self.tally = Tally()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> None:
        for index in range(int((self.end - time.monotonic()) / max(self.interval_s, 1)) + 2):
            if self.stopping.wait(self.interval_s) or time.monotonic() >= self.end - 5:
                return
            problem = self.kill_one(index)
            with self.lock:
                self.tally.record("killed_client", problem)

    def kill_one(self, index: int) -> Optional[str]:
        mode = load.VICTIM_MODES[index % len(load.VICTIM_MODES)]
        receive, send = self.context.Pipe(duplex=False)
        victim = self.context.Process(target=load.victim_main, name=f"victim-{index}",
                                      args=(self.config, mode, index, send), daemon=True)
        victim.start()
        send.close()
        try:
            if not receive.poll(60):
                return f"victim {mode}: no first answer within 60 s (exit code {victim.exitcode})"
            time.sleep(float(np.random.default_rng([self.config.seed, index]).uniform(0, 0.5)))
            if not victim.is_alive():
                return f"victim {mode}: exited with {victim.exitcode} before being killed"
            victim.kill()  # SIGKILL
            victim.join(10)
            return None if victim.exitcode == -signal.SIGKILL else (
                f"victim {mode}: exit code {victim.exitcode} after SIGKILL")
        finally:
            if victim.is_alive():
                victim.kill()
                victim.join(10)
            receive.close()

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            return self.tally.snapshot()


# -- Counting ----------------------------------------------------------------------------------


class Totals:
    """The latest cumulative tally of every worker and the killer, summed on demand."""

    def __init__(self) -> None:
        self.snapshots: Dict[Any, Dict[str, Any]] = {}

    def update(self, source: Any, snapshot: Dict[str, Any]) -> None:
        self.snapshots[source] = snapshot

    def counts(self, key: str) -> Dict[str, int]:
        total = {kind: 0 for kind in KINDS}
        for snapshot in self.snapshots.values():
            for kind, n in snapshot[key].items():
                total[kind] = total.get(kind, 0) + n
        return total

    def failures(self) -> List[str]:
        return [f for s in self.snapshots.values() for f in s["failures"]]


@dataclass
class Row:
    """One line of soak.csv: the server at the end of `minute`, and that minute's calls."""

    minute: int
    elapsed_s: float
    sample: Sample  # at the end of the minute
    rss_floor_kib: int  # the least RSS of the minute's samples (every 5 s, and the end's)
    fds_floor: int  # the least descriptor count of those samples
    threads_max: int  # the most threads of those samples
    cpu_pct: float
    calls: Dict[str, int]  # this minute's, per kind
    unexpected: int  # cumulative

    def csv_fields(self) -> List[Any]:
        return [self.minute, round(self.elapsed_s, 1), self.sample.rss_kib, self.rss_floor_kib,
                self.sample.hwm_kib, self.sample.fds, self.fds_floor, self.sample.threads,
                self.threads_max, round(self.cpu_pct, 1),
                sum(self.calls.values()), round(sum(self.calls.values()) / 60, 1),
                self.unexpected, *[self.calls[k] for k in KINDS]]

    @staticmethod
    def csv_header() -> List[str]:
        return ["minute", "elapsed_s", "rss_kib", "rss_floor_kib", "rss_hwm_kib", "fds",
                "fds_floor", "threads", "threads_max", "server_cpu_pct", "calls", "calls_per_s",
                "unexpected_total", *KINDS]

    def progress(self, minutes: int) -> str:
        calls = sum(self.calls.values())
        return (f"minute {self.minute}/{minutes}: rss {self.sample.rss_kib / 1024:.1f} MiB "
                f"(floor {self.rss_floor_kib / 1024:.1f}), fds {self.sample.fds} (floor "
                f"{self.fds_floor}), threads {self.sample.threads} (max {self.threads_max}), "
                f"server cpu {self.cpu_pct:.0f}%, {calls} calls ({calls / 60:.1f}/s), "
                f"unexpected {self.unexpected}")


# -- The run -----------------------------------------------------------------------------------


class Soak:
    """One soak run: the server, the load, the samples and the final checks."""

    def __init__(self, args: argparse.Namespace, out: Path):
        self.args, self.out = args, out
        self.rows: List[Row] = []
        self.totals = Totals()
        self.problems: List[str] = []  # goals missed and final checks failed
        self.server: Optional[Server] = None

    def start_server(self) -> None:
        binary = self.args.server.resolve()
        if not binary.exists():
            raise SystemExit(f"{binary} does not exist: run `bazel build //server:lmhead_server`"
                             " (or give --server / LMHEAD_SERVER)")
        if not self.args.no_copy:
            binary = copy_server(binary, self.out / "bin")
        self.server = Server(binary, server_args(self.args.model, self.args.server_arg), self.out)
        print(f"soak: server {binary} pid {self.server.pid} on {self.server.address}; "
              f"output in {self.out}", flush=True)

    def prepare_load(self) -> LoadConfig:
        """The workers' configuration: the models served, the heavy call's duration and the
        golden answers, both measured now on the idle server. `end` is set when the load
        starts."""
        config = LoadConfig(address=self.server.address, models=discover_models(
            self.server.address), limits=LIMITS, end=0.0, pause_s=self.args.pause_ms / 1000,
            heavy_s={}, seed=self.args.seed, kinds=self.args.only or list(load.WEIGHTS))
        config.heavy_s = load.calibrate_heavy(config)
        config.golden = load.compute_golden(config, GOLDEN_CASES)
        print(f"soak: models {[m.name for m in config.models]}; heavy call "
              f"{', '.join(f'{n} {s * 1000:.0f}' for n, s in config.heavy_s.items())} ms; "
              f"{len(config.golden)} golden answers", flush=True)
        return config

    def run(self) -> int:
        """Starts the server, runs the load for --minutes while sampling, checks, stops the
        server and reports; the exit status."""
        self.start_server()
        minutes = self.args.minutes
        config = self.prepare_load()
        context = multiprocessing.get_context("spawn")
        queue, stop = context.Queue(), context.Event()
        start = time.monotonic()
        config.end = start + 60 * minutes
        workers = [context.Process(target=load.worker_main, args=(config, i, queue, stop),
                                   name=f"worker-{i}", daemon=True)
                   for i in range(self.args.workers)]
        for worker in workers:
            worker.start()
        killer = Killer(context, config, self.args.kill_every, config.end)
        if self.args.kill_every > 0:
            killer.start()
        first = read_sample(self.server.pid)
        self.rows.append(self.make_row(0, start, first, [first], None))
        print(self.rows[-1].progress(minutes), flush=True)
        self.sample_loop(start, minutes, queue, killer)
        stop.set()  # at the end anyway, unless the server died
        self.finish_load(workers, queue, killer)
        self.final_checks(config)
        self.stop_server()
        return self.report(minutes)

    def sample_loop(self, start: float, minutes: int, queue: Any, killer: Killer) -> None:
        """Collects the workers' tallies, samples the server every 5 s and writes one row per
        minute until the end (or until the server dies)."""
        previous = read_sample(self.server.pid)
        for minute in range(1, minutes + 1):
            due = start + 60 * minute
            samples: List[Sample] = []
            next_sample = time.monotonic()
            for _ in range(100000):  # bounded: each turn waits up to 1 s or takes a message
                now = time.monotonic()
                if now >= due or not self.server.alive():
                    break
                if now >= next_sample:
                    samples += self.sample()
                    next_sample += SAMPLE_EVERY_S
                self.drain(queue, min(1.0, max(0.0, min(due, next_sample) - now)))
            sample = next(iter(self.sample()), None)
            if sample is None or not self.server.alive():
                self.problems.append(f"the server died in minute {minute}: exit status "
                                     f"{self.server.process.returncode}\n{self.server.log_tail()}")
                return
            self.totals.update("killer", killer.snapshot())
            self.rows.append(self.make_row(minute, start, sample, samples + [sample], previous))
            previous = sample
            print(self.rows[-1].progress(minutes), flush=True)

    def sample(self) -> List[Sample]:
        """[the server's sample], or [] when it has just exited (gone, or a zombie without
        VmRSS)."""
        try:
            return [read_sample(self.server.pid)]
        except (OSError, KeyError, ValueError, IndexError):
            return []

    def drain(self, queue: Any, timeout_s: float) -> None:
        """Takes the workers' messages waiting in the queue (waits up to timeout_s for one)."""
        try:
            _, source, snapshot = queue.get(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - queue.Empty
            return
        self.totals.update(source, snapshot)
        for _ in range(1000):
            try:
                _, source, snapshot = queue.get_nowait()
            except Exception:  # noqa: BLE001 - queue.Empty
                return
            self.totals.update(source, snapshot)

    def make_row(self, minute: int, start: float, sample: Sample, samples: List[Sample],
                 previous: Optional[Sample]) -> Row:
        calls = self.totals.counts("calls")
        before = {k: 0 for k in KINDS}
        if self.rows:
            cumulative = [r.calls for r in self.rows]
            before = {k: sum(c[k] for c in cumulative) for k in KINDS}
        elapsed = time.monotonic() - start
        cpu = 0.0 if previous is None else 100 * (sample.cpu_s - previous.cpu_s) / 60
        return Row(minute, elapsed, sample, min(s.rss_kib for s in samples),
                   min(s.fds for s in samples), max(s.threads for s in samples), cpu,
                   {k: calls[k] - before[k] for k in KINDS},
                   sum(self.totals.counts("unexpected").values()))

    def finish_load(self, workers: List[Any], queue: Any, killer: Killer) -> None:
        """Waits for the workers' last calls (each ends within its deadline) and the killer."""
        killer.stopping.set()
        deadline = time.monotonic() + CALL_TIMEOUT_S + 30
        for worker in workers:
            while worker.is_alive() and time.monotonic() < deadline:
                self.drain(queue, 0.2)
                worker.join(0.1)
            if worker.is_alive():
                self.problems.append(f"{worker.name} did not finish in time; killed")
                worker.kill()
            elif worker.exitcode != 0:
                self.problems.append(f"{worker.name} exited with {worker.exitcode}")
        self.drain(queue, 0.5)
        if killer.ident is not None:  # started
            killer.join(90)
        self.totals.update("killer", killer.snapshot())

    def final_checks(self, config: LoadConfig) -> None:
        """After the load: still serving, still right, no admission slot leaked."""
        if not self.server.alive():
            return
        checks = [("health", lambda: final_health(config)),
                  ("golden", lambda: final_golden(config)),
                  ("admission", lambda: load.admission_check(config))]
        for name, check in checks:
            try:
                problem = check()
            except Exception as error:  # noqa: BLE001 - reported as the check's failure
                problem = f"{type(error).__name__}: {error}"
            if problem is not None:
                self.problems.append(f"final check {name}: {problem}")
        print(f"soak: final checks {'passed' if not self.problems else 'FAILED'}", flush=True)

    def stop_server(self) -> None:
        """SIGTERM; the server must exit 0 within its grace period (and some)."""
        if not self.server.alive():
            if not any(p.startswith("the server died") for p in self.problems):
                self.problems.append(f"the server exited with {self.server.process.returncode} "
                                     f"before SIGTERM\n{self.server.log_tail()}")
            return
        returncode = self.server.stop(SHUTDOWN_GRACE_S + 30)
        if returncode != 0:
            self.problems.append(f"the server exited with {returncode} on SIGTERM, expected 0\n"
                                 f"{self.server.log_tail()}")

    def report(self, minutes: int) -> int:
        """Writes soak.csv, failures.txt and summary.txt, prints the summary; 0 when every
        goal is met."""
        write_csv(self.out / "soak.csv", self.rows)
        lines = summary(self.rows, self.totals, minutes, self.server.log_path)
        goals, missed = check_goals(self.rows, self.totals, minutes)
        lines += goals + [f"PROBLEM {p}" for p in self.problems]
        verdict = "PASS" if not missed and not self.problems else "FAIL"
        lines.append(f"soak: {verdict} ({self.out})")
        failures = self.totals.failures() + self.problems
        (self.out / "failures.txt").write_text("\n".join(failures) + ("\n" if failures else ""))
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
        return 0 if verdict == "PASS" else 1


def final_health(config: LoadConfig) -> Optional[str]:
    with load.RemoteLMHead(config.address, timeout=CALL_TIMEOUT_S) as head:
        status = head.health()
    return None if status == "SERVING" else f"health is {status}"


def final_golden(config: LoadConfig) -> Optional[str]:
    """Every golden case once more, on the server after the load."""
    again = load.compute_golden(config, len(config.golden))
    for before, after in zip(config.golden, again):
        case = load.make_golden_case(config.seed, before.index,
                                     config.models[before.index % len(config.models)])
        problem = load.compare_fields(after.outputs, before.outputs, case)
        if problem is not None:
            return f"golden case {before.index}: {problem}"
    return None


# -- Results -----------------------------------------------------------------------------------


def write_csv(path: Path, rows: List[Row]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(Row.csv_header())
        for row in rows:
            writer.writerow(row.csv_fields())


def growth_windows(rows: List[Row]) -> Tuple[List[Row], List[Row]]:
    """(samples at minutes 5, 6, 7; the last three samples)."""
    first = [r for r in rows if r.minute in GROWTH_FIRST]
    return first, rows[-GROWTH_LAST:]


def check_goals(rows: List[Row], totals: Totals, minutes: int) -> Tuple[List[str], bool]:
    """(lines saying each goal and its number, whether one was missed)."""
    lines, missed = [], False
    unexpected = sum(totals.counts("unexpected").values())
    ok = unexpected == 0
    lines.append(f"goal unexpected outcomes == 0: {unexpected} {'ok' if ok else 'MISSED'}")
    missed |= not ok
    if minutes < GROWTH_MIN_MINUTES or rows[-1].minute < minutes:
        lines.append(f"growth goals skipped (a run of {rows[-1].minute} of {minutes} minutes; "
                     f"they need >= {GROWTH_MIN_MINUTES} completed minutes)")
        return lines, missed or rows[-1].minute < minutes
    first, last = growth_windows(rows)
    rss0 = statistics.median(r.rss_floor_kib for r in first)
    rss1 = statistics.median(r.rss_floor_kib for r in last)
    growth = (rss1 - rss0) / rss0
    ok = growth < RSS_GROWTH_GOAL
    lines.append(f"goal RSS growth < {RSS_GROWTH_GOAL:.0%} (per-minute floors: median of minutes "
                 f"5-7 vs median of the last {GROWTH_LAST}): {rss0 / 1024:.1f} -> "
                 f"{rss1 / 1024:.1f} MiB, "
                 f"{growth:+.2%} {'ok' if ok else 'MISSED'}")
    missed |= not ok
    fd0 = statistics.median(r.fds_floor for r in first)
    fd1 = statistics.median(r.fds_floor for r in last)
    ok = fd1 <= fd0
    lines.append(f"goal no descriptor growth (per-minute floors, same windows): {fd0:g} -> "
                 f"{fd1:g} {'ok' if ok else 'MISSED'}")
    missed |= not ok
    th0 = statistics.median(r.sample.threads for r in first)
    th1 = statistics.median(r.sample.threads for r in last)
    lines.append(f"threads (no goal; at the minute marks, same windows): {th0:g} -> {th1:g}")
    return lines, missed


def summary(rows: List[Row], totals: Totals, minutes: int, log_path: Path) -> List[str]:
    """The per-minute table, the calls per kind and the deviations seen."""
    lines = ["", "minute  rss_MiB  floor_MiB  hwm_MiB  fds  fds_floor  threads  threads_max  "
                 "cpu%  calls/s  unexpected"]
    for r in rows:
        lines.append(f"{r.minute:6d}  {r.sample.rss_kib / 1024:7.1f}  {r.rss_floor_kib / 1024:9.1f}"
                     f"  {r.sample.hwm_kib / 1024:7.1f}  {r.sample.fds:3d}  {r.fds_floor:9d}  "
                     f"{r.sample.threads:7d}  {r.threads_max:11d}  {r.cpu_pct:4.0f}  "
                     f"{sum(r.calls.values()) / 60:7.1f}  {r.unexpected:10d}")
    calls, unexpected = totals.counts("calls"), totals.counts("unexpected")
    seconds = max(1.0, rows[-1].elapsed_s)
    lines += ["", "kind              calls    per_s  unexpected"]
    for kind in KINDS:
        lines.append(f"{kind:16s} {calls[kind]:6d}  {calls[kind] / seconds:7.2f}  "
                     f"{unexpected[kind]:10d}")
    total = sum(calls.values())
    lines.append(f"{'all':16s} {total:6d}  {total / seconds:7.2f}  "
                 f"{sum(unexpected.values()):10d}")
    for failure in totals.failures()[:20]:
        lines.append(f"UNEXPECTED {failure}")
    lines.append(f"server log: {log_path} ({log_levels(log_path)})")
    lines.append("")
    return lines


def log_levels(log_path: Path) -> str:
    """Lines per level in the server's text log ('... info [...' )."""
    counts: Dict[str, int] = {}
    with open(log_path, errors="replace") as f:
        for line in f:
            parts = line.split(" ", 3)
            level = parts[1] if len(parts) > 2 and parts[0][:2] == "20" else "other"
            counts[level] = counts.get(level, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def run(args: argparse.Namespace, out: Path) -> int:
    """One soak run with soak.py's arguments, its files in `out`; the exit status."""
    unknown = sorted(set(args.only or []) - set(load.WEIGHTS))
    if unknown:
        raise SystemExit(f"--only: unknown kinds {unknown}; the kinds are {list(load.WEIGHTS)}")
    # SIGTERM, or SIGINT (which a shell ignores in background jobs), ends the soak through the
    # `finally` below: the server is stopped, and the daemonic workers and victims end with
    # this process.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _interrupted)
    soak = Soak(args, out)
    try:
        return soak.run()
    except KeyboardInterrupt as interrupt:
        print(f"{interrupt or 'soak: interrupted'}; stopping the server", flush=True)
        return 130
    finally:
        if soak.server is not None and soak.server.alive():
            soak.server.stop(SHUTDOWN_GRACE_S + 30)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"soak: stopped by signal {signum}")
